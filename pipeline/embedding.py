"""Token-embedding analysis for the embed stage: co-occurrence counts, tokens per language, neighbours, a PCA plot.

Numpy / scipy only (no torch): the embed stage runs it on its initial table, ``sokhan embed --inspect`` on a trained
model's. Shards follow the tokenize layout: each line is ``<|lang:xx|>`` + tokens + ``<|eos|>``, so a token's
language is that of the last language marker before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

CHUNK = 1 << 22  # tokens per co-occurrence chunk: bounds the index arrays to a few hundred MB


def _language_markers(meta: dict) -> dict[str, int]:
    return {k[len("<|lang:") : -2]: v for k, v in meta["special_tokens"].items() if k.startswith("<|lang:")}


def token_languages(shard: np.ndarray, meta: dict) -> dict[str, np.ndarray]:
    """Per language, how often each token id occurs in its lines: {lang: (V,) int64}; languages absent are left out."""
    vocab = int(meta["vocab_size"])
    markers = _language_markers(meta)
    out = {lang: np.zeros(vocab, dtype=np.int64) for lang in markers}
    for start in range(0, len(shard), CHUNK):
        ids = np.asarray(shard[start : start + CHUNK]).astype(np.int64)
        code = np.full(len(ids), -1)
        for j, tid in enumerate(markers.values()):
            code[ids == tid] = j
        # Carry the language of the previous chunk's last line into this one.
        if start and (prev := _last_language(shard[:start], markers)) is not None:
            code[0] = code[0] if code[0] >= 0 else prev
        last = np.maximum.accumulate(np.where(code >= 0, np.arange(len(ids)), -1))
        lang_of = np.where(last >= 0, code[np.maximum(last, 0)], -1)
        for j, lang in enumerate(markers):
            out[lang] += np.bincount(ids[lang_of == j], minlength=vocab)
    return {lang: c for lang, c in out.items() if c.sum()}


def _last_language(shard: np.ndarray, markers: dict[str, int]) -> int | None:
    ids = np.asarray(shard[-CHUNK:])
    hits = [(np.flatnonzero(ids == tid), j) for j, tid in enumerate(markers.values())]
    best = max(((h[-1], j) for h, j in hits if len(h)), default=None)
    return None if best is None else best[1]


def cooccurrence(shard: np.ndarray, meta: dict, vocab: int, window: int):
    """Symmetric (V, V) scipy CSR of co-occurrences within ``window`` positions inside one line, weighted 1/distance."""
    import scipy.sparse as sp

    eos = meta["special_tokens"]["<|eos|>"]
    total = sp.csr_matrix((vocab, vocab), dtype=np.float64)
    n = len(shard)
    for start in range(0, n, CHUNK):
        ids = np.asarray(shard[start : start + CHUNK + window]).astype(np.int64)
        line = np.cumsum(ids == eos)  # an eos closes its line: it pairs with its line's tokens, not the next's
        line[ids == eos] -= 1
        m = min(CHUNK, n - start)  # left positions owned by this chunk
        rows, cols, weights = [], [], []
        for d in range(1, window + 1):
            k = min(m, len(ids) - d)
            if k <= 0:
                break
            same = line[:k] == line[d : d + k]
            if not same.any():  # no line is longer than d: none pairs farther (embed.window = 10**9 took minutes)
                break
            rows.append(ids[:k][same])
            cols.append(ids[d : d + k][same])
            weights.append(np.full(int(same.sum()), 1.0 / d))
        if rows:
            r, c, w = np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)
            total = total + sp.coo_matrix((w, (r, c)), shape=(vocab, vocab)).tocsr()
    return (total + total.T).tocsr()


def frequent_tokens(counts: dict[str, np.ndarray], text: Callable[[int], str], special: set[int], n: int) -> dict[str, list[int]]:
    """The ``n`` most frequent word-like tokens of each language, most frequent first.

    A token belongs to the language that uses it most (at least half its occurrences); tokens that decode to
    punctuation, whitespace or a partial UTF-8 sequence (U+FFFD) are left out: they do not label a plot.
    """
    overall = sum(counts.values())
    out = {}
    for lang, c in counts.items():
        chosen = []
        for tid in np.argsort(-c, kind="stable"):
            if c[tid] == 0 or len(chosen) == n:
                break
            if tid in special or 2 * c[tid] < overall[tid]:
                continue
            t = text(int(tid))
            if readable(t) and any(ch.isalnum() for ch in t):
                chosen.append(int(tid))
        out[lang] = chosen
    return out


def readable(t: str) -> bool:
    """Whether a decoded token is whole text: no partial UTF-8 sequence (U+FFFD), no control characters."""
    # ZWNJ / ZWJ are not "printable" to Python but are part of Persian words (می‌کند): 76 tokens of a vocabulary.
    return bool(t.strip()) and "\ufffd" not in t and all(c.isprintable() or c in "\u200c\u200d" for c in t)


def display(t: str) -> str:
    """A token as a plot label: a leading space shown as ▁ (as SentencePiece does), so " at" and "at" differ."""
    return "\u2581" + t[1:].strip() if t.startswith(" ") else t.strip()


def nearest_neighbours(table: np.ndarray, queries: dict[str, list[int]], text: Callable[[int], str], candidates: np.ndarray, k: int) -> dict:
    """Cosine nearest neighbours of each query token among ``candidates`` ((V,) bool): a JSON-ready report."""
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)  # (V, D)
    excluded = ~candidates
    report: dict = {"metric": "cosine", "k": k, "languages": {}}
    for lang, ids in queries.items():
        entries = []
        for q in ids:
            sims = unit @ unit[q]  # (V,)
            sims[excluded] = -np.inf
            sims[q] = -np.inf
            top = np.argsort(-sims, kind="stable")[:k]
            top = top[np.isfinite(sims[top])]  # fewer candidates than k: no excluded token fills the list (-inf)
            entries.append({
                "id": q, "token": text(q),
                "neighbours": [{"id": int(t), "token": text(int(t)), "cosine": round(float(sims[t]), 4)} for t in top],
            })
        report["languages"][lang] = entries
    return report


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``x`` (n, D) projected on their first two principal axes (n, 2), and the variance share of each."""
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s**2 / max((s**2).sum(), 1e-30)
    return centred @ vt[:2].T, var[:2]


def plot_pca(table: np.ndarray, tokens: dict[str, list[int]], text: Callable[[int], str], path: Path, title: str) -> None:
    """One panel per language: its chosen tokens' vectors in that language's own 2-D PCA, each labelled with its text.

    Per-language axes keep the labels apart; one PCA over all languages mostly separates the languages (scripts
    share no tokens) and piles each language's words onto a few pixels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sokhan.pipeline import plotting

    plotting.setup_fonts()
    langs = [lang for lang, ids in tokens.items() if ids]
    fig, axes = plt.subplots(1, max(1, len(langs)), figsize=(7 * max(1, len(langs)), 7), squeeze=False)
    for ax, lang, colour in zip(axes[0], langs, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        ids = tokens[lang]
        if len(ids) >= 3:
            xy, var = pca_2d(table[ids].astype(np.float64))
            ax.set_xlabel(f"PC 1 ({100 * var[0]:.1f}% of variance)")
            ax.set_ylabel(f"PC 2 ({100 * var[1]:.1f}% of variance)")
        else:
            xy = np.zeros((len(ids), 2))
        ax.scatter(xy[:, 0], xy[:, 1], s=16, color=colour)
        labels = [ax.annotate(plotting.label(display(text(tid))), (px, py), xytext=(3, 3), textcoords="offset points",
                              fontsize=11) for (px, py), tid in zip(xy, ids)]
        ax.set_title(f"{lang}: {len(ids)} most frequent tokens")
        ax.grid(alpha=0.3)
        plotting.place_labels(fig, labels)
    if not langs:
        axes[0][0].text(0.5, 0.5, "no word-like tokens to draw", ha="center", transform=axes[0][0].transAxes)
    fig.suptitle(title)
    plotting.save(fig, path)
