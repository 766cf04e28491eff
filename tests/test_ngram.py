"""The Kneser-Ney baseline: normalisation, the unigram case and a brute-force reference."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from sokhan import SokhanError
from sokhan.pipeline.ngram import MIN_DISCOUNT, KneserNey


def _corpus(rng: np.random.Generator, V: int, T: int) -> np.ndarray:
    """Tokens with some structure (a sticky Markov chain) so that every order has repeated n-grams."""
    t = [int(rng.integers(V))]
    for _ in range(T - 1):
        t.append((t[-1] * 7 + 3) % V if rng.random() < 0.6 else int(rng.integers(V)))
    return np.array(t, dtype=np.int64)


def _discounts(counts) -> list[float]:
    n = Counter(min(c, 5) for c in counts if c > 0)
    y = n[1] / (n[1] + 2 * n[2]) if n[1] + n[2] else 0.5
    d = [0.0]
    for r in (1, 2, 3):
        dr = r - (r + 1) * y * n[r + 1] / n[r] if n[r] else y * r
        d.append(min(max(dr, MIN_DISCOUNT), r))
    return d


def _brute_force(tokens, order: int, V: int):
    """P(w | ctx) straight from the Chen & Goodman formulas, with dictionaries and loops."""
    t = [int(x) for x in tokens]
    raw = {k: Counter(tuple(t[i : i + k]) for i in range(len(t) - k + 1)) for k in range(1, order + 1)}
    used = {order: raw[order]}
    for k in range(1, order):
        used[k] = Counter({g: len({h[0] for h in raw[k + 1] if h[1:] == g}) for g in raw[k]})
    disc = {k: _discounts(used[k].values()) for k in used}

    def prob(k: int, ctx: tuple, w: int) -> float:
        if k == 0:
            return 1.0 / V
        lower = prob(k - 1, ctx[1:], w)
        kids = {g: c for g, c in used[k].items() if g[:-1] == ctx and c > 0}
        total = sum(kids.values())
        if total == 0:
            return lower
        c = used[k].get(ctx + (w,), 0)
        gamma = sum(disc[k][min(cc, 3)] for cc in kids.values()) / total
        return max(c - disc[k][min(c, 3)], 0.0) / total + gamma * lower

    return lambda ctx, w: prob(order, tuple(ctx)[len(ctx) - (order - 1) :] if order > 1 else (), w)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_distribution_sums_to_one(order):
    rng = np.random.default_rng(order)
    V = 60
    train = _corpus(rng, V - 5, 3000)  # the last 5 ids never occur in training
    lm = KneserNey(order, V).fit(train)
    for _ in range(50):
        n = int(rng.integers(0, 8))
        ctx = rng.integers(V, size=n) if rng.random() < 0.3 else train[(s := int(rng.integers(len(train) - n))) : s + n]
        p = lm.distribution(ctx)
        assert p.dtype == np.float64 and p.shape == (V,)
        assert abs(p.sum() - 1.0) < 1e-9
        assert (p > 0).all()


def test_order_one_is_discounted_unigram():
    rng = np.random.default_rng(0)
    V = 40
    train = _corpus(rng, 30, 500)
    lm = KneserNey(1, V).fit(train)
    c = np.bincount(train, minlength=V)
    d = _discounts(c.tolist())
    kept = np.array([max(x - d[min(x, 3)], 0.0) for x in c])
    expected = kept / len(train) + (1 - kept.sum() / len(train)) / V
    np.testing.assert_allclose(lm.distribution([]), expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(lm.distribution([1, 2, 3]), expected, rtol=0, atol=1e-15)  # context is ignored
    assert lm.distribution([])[35] == pytest.approx((1 - kept.sum() / len(train)) / V)  # unseen: the uniform share


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_brute_force(order):
    rng = np.random.default_rng(10 + order)
    V = 6
    train = _corpus(rng, 5, 80)  # id 5 never seen
    lm = KneserNey(order, V).fit(train)
    ref = _brute_force(train, order, V)
    contexts = list(itertools.product(range(V), repeat=order - 1))
    for ctx in contexts:
        got = lm.distribution(ctx)
        want = np.array([ref(ctx, w) for w in range(V)])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"context {ctx}")


def test_score_matches_distribution():
    rng = np.random.default_rng(3)
    V = 30
    train = _corpus(rng, V, 2000)
    test = _corpus(np.random.default_rng(4), V, 200)
    lm = KneserNey(3, V).fit(train)
    positions = np.arange(1, len(test))
    logp, rank = lm.score(test, positions, topk=5)
    for i, p in enumerate(positions):
        dist = lm.distribution(test[max(0, p - 2) : p])
        assert logp[i] == pytest.approx(np.log(dist[test[p]]), abs=1e-12)
        assert rank[i] == min(int((dist >= dist[test[p]]).sum()) - 1, 5)
    # A model fitted on the test stream itself predicts it better than one fitted on other text.
    own, _ = KneserNey(3, V).fit(test).score(test, positions)
    assert own.mean() > logp.mean()


def test_bad_input():
    with pytest.raises(SokhanError, match="ngram_order"):
        KneserNey(0, 10)
    with pytest.raises(SokhanError, match=r"\[0, 10\)"):
        KneserNey(2, 10).fit(np.array([1, 2, 10]))
    with pytest.raises(SokhanError, match="non-empty"):
        KneserNey(2, 10).fit(np.array([], dtype=np.int64))
