"""Interpolated modified Kneser-Ney n-gram model over token ids (Chen & Goodman 1998), numpy only.

The count-based baseline the neural models are measured against. N-grams are counted on the flat token stream
(the same stream the neural model trains on: ``<|lang:xx|>`` + tokens + ``<|eos|>`` per line, lines
concatenated). Each order k keeps its n-grams as sorted int64 keys ``id(context) * V + w``, where ``id(context)``
is the row of the (k-1)-gram in order k-1's table, so a context's continuations are one contiguous slice.

The distribution at order k, for a context h of k-1 tokens and its shortened context h' (h without its first
token)::

    P_k(w | h) = max(c_k(h w) - D_k(c_k(h w)), 0) / c_k(h •)  +  γ_k(h) · P_{k-1}(w | h')
    γ_k(h)     = (D_k1 · N1(h •) + D_k2 · N2(h •) + D_k3+ · N3+(h •)) / c_k(h •)
    P_0(w)     = 1 / V

where c_k is the raw count at the highest order and the continuation count (number of distinct tokens seen to
the left) below it; a context never seen (c_k(h •) = 0) gives P_k = P_{k-1}. The three discounts per order come
from that order's count-of-counts: Y = n1 / (n1 + 2 n2), D_r = r - (r + 1) Y n_{r+1} / n_r. Order 1 is thus an
absolute-discounted unigram interpolated with the uniform distribution, and every word of the vocabulary gets
probability > 0.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from sokhan import SokhanError

# Discounts are clipped into [MIN_DISCOUNT, r]: above r a probability would go negative; at 0 (tiny corpora with
# degenerate count-of-counts) unseen tokens would get no mass from that order.
MIN_DISCOUNT = 0.05


@dataclass
class _Order:
    """One order's n-grams: sorted keys, the counts used at this order, and per-context statistics."""

    keys: np.ndarray  # (n_k,) int64, sorted: context_id * V + w
    words: np.ndarray  # (n_k,) int64: w, the last token of each n-gram
    counts: np.ndarray  # (n_k,) int64: raw counts (highest order) or continuation counts (lower orders)
    discounts: np.ndarray  # (4,) float64: D(0) = 0, D(1), D(2), D(3+)
    ctx_start: np.ndarray  # (n_{k-1} + 1,) int64: continuations of context c are keys[ctx_start[c]:ctx_start[c + 1]]
    ctx_total: np.ndarray  # (n_{k-1},) float64: c_k(h •)
    ctx_gamma: np.ndarray  # (n_{k-1},) float64: γ_k(h); 1 where the context has no mass


def _discounts(counts: np.ndarray) -> np.ndarray:
    """Modified KN discounts (D(0)=0, D1, D2, D3+) from the count-of-counts of ``counts``."""
    n = np.bincount(counts[counts > 0].clip(max=5), minlength=6)[1:5].astype(np.float64)  # n1..n4
    d = np.zeros(4)
    y = n[0] / (n[0] + 2 * n[1]) if n[0] + n[1] > 0 else 0.5
    for r in (1, 2, 3):
        # With n_r = 0 no count equals r, so the value only matters for counts above r: fall back to Y·r.
        dr = r - (r + 1) * y * n[r] / n[r - 1] if n[r - 1] > 0 else y * r
        d[r] = min(max(dr, MIN_DISCOUNT), r)
    return d


def _lookup(keys: np.ndarray, want: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Row of each ``want`` in sorted ``keys`` where ``ok`` and present, else -1."""
    if len(keys) == 0:
        return np.full(len(want), -1, np.int64)
    pos = np.minimum(np.searchsorted(keys, want), len(keys) - 1)  # (ndarray.clip is slow in numpy 1.24)
    return np.where(ok & (keys[pos] == want), pos, -1).astype(np.int64)


class KneserNey:
    """An interpolated modified Kneser-Ney model of order ``order`` over ``vocab_size`` token ids.

    ``KneserNey(order, vocab_size).fit(tokens)``; then ``distribution(context)`` (one dense (V,) float64
    vector summing to 1) or ``score(tokens, positions)`` (log-probabilities and top-k hits at many positions).
    """

    def __init__(self, order: int = 5, vocab_size: int = 0):
        if order < 1:
            raise SokhanError(f"config: evaluate.ngram_order = {order} must be ≥ 1")
        if vocab_size < 1:
            raise SokhanError(f"n-gram: vocab_size = {vocab_size} must be ≥ 1")
        self.order = order
        self.vocab_size = vocab_size
        self.orders: list[_Order] = []

    def fit(self, tokens: np.ndarray) -> "KneserNey":
        """Count every n-gram of ``tokens`` (1-D ids < vocab_size) up to ``order``; returns self."""
        t = np.asarray(tokens, dtype=np.int64)
        if t.ndim != 1 or len(t) == 0:
            raise SokhanError("n-gram: training tokens must be a non-empty 1-D array")
        if t.min() < 0 or t.max() >= self.vocab_size:
            raise SokhanError(f"n-gram: token ids must lie in [0, {self.vocab_size}), got [{t.min()}, {t.max()}]")
        V, T = self.vocab_size, len(t)

        # ids[k - 1][i]: row of the k-gram starting at position i in order k's table (positions 0 .. T - k).
        ids: list[np.ndarray] = []
        keys_by_order: list[np.ndarray] = []
        raw_by_order: list[np.ndarray] = []
        for k in range(1, self.order + 1):
            if T < k:
                keys_by_order.append(np.zeros(0, np.int64))
                raw_by_order.append(np.zeros(0, np.int64))
                ids.append(np.zeros(0, np.int64))
                continue
            keys = t[k - 1 :].copy() if k == 1 else ids[k - 2][: T - k + 1] * V + t[k - 1 :]
            if k > 1 and len(keys_by_order[k - 2]) * V >= np.iinfo(np.int64).max:
                raise SokhanError(f"n-gram: too many {k - 1}-grams for int64 keys with V = {V}")
            uniq, inverse, raw = np.unique(keys, return_inverse=True, return_counts=True)
            keys_by_order.append(uniq)
            raw_by_order.append(raw.astype(np.int64))
            ids.append(inverse.astype(np.int64).reshape(-1))

        self.orders = []
        for k in range(1, self.order + 1):
            keys = keys_by_order[k - 1]
            if k == self.order:
                counts = raw_by_order[k - 1]
            else:
                # Continuation count of a k-gram: how many distinct (k+1)-grams end with it. The (k+1)-gram at
                # position i ends with the k-gram at position i + 1; each (k+1)-gram has exactly one such suffix.
                longer = ids[k]  # (T - k,)
                suffix = np.zeros(len(keys_by_order[k]), np.int64)
                suffix[longer] = ids[k - 1][1 : 1 + len(longer)]
                counts = np.bincount(suffix, minlength=len(keys)).astype(np.int64)
            n_ctx = 1 if k == 1 else len(keys_by_order[k - 2])
            ctx_of = keys // V if k > 1 else np.zeros(len(keys), np.int64)
            d = _discounts(counts)
            total = np.bincount(ctx_of, weights=counts, minlength=n_ctx)
            by_class = [np.bincount(ctx_of, weights=(counts.clip(max=3) == r), minlength=n_ctx) for r in (1, 2, 3)]
            mass = d[1] * by_class[0] + d[2] * by_class[1] + d[3] * by_class[2]
            gamma = np.divide(mass, total, out=np.ones(n_ctx), where=total > 0)
            start = np.searchsorted(ctx_of, np.arange(n_ctx + 1))
            self.orders.append(_Order(keys, keys % V, counts, d, start, total, gamma))
        return self

    def _context_ids(self, tokens: np.ndarray) -> list[np.ndarray]:
        """ends[j - 1][p]: row of the j-gram ending at position p in order j's table, or -1 (j = 1 .. order-1)."""
        t = np.asarray(tokens, dtype=np.int64)
        ends: list[np.ndarray] = []
        for j in range(1, self.order):
            if j == 1:
                want, ok = t, (t >= 0) & (t < self.vocab_size)
            else:
                prev = ends[-1]
                ok = np.zeros(len(t), bool)
                ok[1:] = prev[:-1] >= 0
                want = np.where(ok, np.roll(prev, 1) * self.vocab_size + t, 0)
            ends.append(_lookup(self.orders[j - 1].keys, want, ok))
        return ends

    def _dense(self, ctx_rows: list[int]) -> np.ndarray:
        """P(· | context) as a (V,) float64 vector; ctx_rows[j - 1] is the context's row in order j (or -1)."""
        V = self.vocab_size
        p = np.full(V, 1.0 / V)
        for k in range(1, self.order + 1):
            o = self.orders[k - 1]
            c = 0 if k == 1 else ctx_rows[k - 2]
            if c < 0 or o.ctx_total[c] <= 0:
                continue  # an unseen context: P_k = P_{k-1}
            s, e = o.ctx_start[c], o.ctx_start[c + 1]
            cnt = o.counts[s:e]
            words = o.words[s:e]
            disc = o.discounts[np.minimum(cnt, 3)]
            p *= o.ctx_gamma[c]
            p[words] += np.maximum(cnt - disc, 0.0) / o.ctx_total[c]
        return p

    def _row(self, gram: list[int]) -> int:
        """Row of the n-gram ``gram`` in order len(gram)'s table, or -1: its prefixes looked up one by one, as
        ``fit`` keyed them (a k-gram's key is its (k-1)-gram prefix's row · V + its last token)."""
        row = -1
        for k, w in enumerate(gram, start=1):
            if not 0 <= w < self.vocab_size:
                return -1
            keys = self.orders[k - 1].keys
            key = w if k == 1 else row * self.vocab_size + w
            row = bisect.bisect_left(keys, key)
            if row == len(keys) or keys[row] != key:
                return -1
        return row

    def distribution(self, context) -> np.ndarray:
        """P(w | context) for every w: (V,) float64. Only the last order-1 tokens of ``context`` matter.

        The next-word search calls this for every hypothesis it extends (tens of thousands of times per
        evaluation) with a context of at most order-1 tokens: scalar lookups, where ``score``'s vectorized
        ``_context_ids`` spent most of a call on numpy's per-call overhead."""
        ctx = [int(x) for x in list(context)[-(self.order - 1) :]] if self.order > 1 else []
        rows = [-1] * (self.order - 1)
        # The j-gram that ends at the context's last token is the order-(j+1) context.
        for j in range(1, len(ctx) + 1):
            rows[j - 1] = self._row(ctx[len(ctx) - j :])
        return self._dense(rows)

    def score(self, tokens: np.ndarray, positions: np.ndarray, topk: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Log-probabilities (natural log) of tokens[p] given tokens[:p], and the rank of tokens[p], at each p.

        tokens (T,); positions (P,) with 1 ≤ p < T. Returns (logp (P,) float64, rank (P,) int64) where rank 0 is
        the most likely token; ties are broken against the target (a token must beat every other to rank 0).
        Ranks ≥ topk are reported as topk, so only the top-k accuracies are exact.
        """
        t = np.asarray(tokens, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions.min() < 1 or positions.max() >= len(t)):
            raise ValueError(f"positions must lie in [1, {len(t)})")
        ends = self._context_ids(t) if self.order > 1 else []
        logp = np.empty(len(positions))
        rank = np.empty(len(positions), np.int64)
        for i, p in enumerate(positions):
            rows = [int(ends[j][p - 1]) for j in range(self.order - 1)]  # the j+1-gram ending just before p
            dist = self._dense(rows)
            target = dist[t[p]]
            logp[i] = np.log(target)
            rank[i] = min(int(np.count_nonzero(dist >= target)) - 1, topk)
        return logp, rank

    def stats(self) -> dict:
        """Sizes and discounts per order, for the report."""
        return {
            "order": self.order,
            "ngrams": [int(len(o.keys)) for o in self.orders],
            "discounts": [[round(float(x), 4) for x in o.discounts[1:]] for o in self.orders],
        }
