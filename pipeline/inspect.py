"""`sokhan inspect`: what a trained model looks at, for one text.

Transformer: the attention weights of every head, one heatmap per head (rows: the predicting token, columns: the
tokens it attends to), one figure per layer. They are recomputed from q and k inside a forward pre-hook on each
attention module (the model itself runs a fused kernel that never materialises them).

Mamba: Δ, the step size of the selective scan, per token and channel, one heatmap per layer (relative to each
channel's mean), with the mean over channels above it. A large Δ lets the token's input overwrite the state (the
model chooses to remember it); a small one lets the state flow past the token unchanged. Δ = softplus(dt_proj(x) +
bias) is captured by wrapping each mixer's ``_ssm_params_channel_major`` for the duration of one forward pass; the
LTI ablation's Δ is the same at every token.

Tokens are labelled with their text (``plotting.label``: Persian shaped and in visual order); time runs left to
right, whatever the script's direction: a Persian sentence's first token is the leftmost column.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sokhan import SokhanError


def attention_maps(model, ids) -> list:
    """Attention weights per layer, each (H, L, L) float64 numpy (row t: how token t's query spreads over 0..t).

    ids (1, L) int64 tensor; ``model`` a ``Transformer``.
    """
    import torch

    from sokhan.pipeline.models.transformer import CausalSelfAttention

    maps: list = []

    def hook(module, args):
        x, cos, sin = args[:3]
        q, k, _ = module._project(x, cos, sin)  # (B, nh, L, hs)
        scores = (q.double() @ k.double().transpose(-1, -2)) / module.head_dim**0.5  # (B, nh, L, L)
        L = scores.shape[-1]
        causal = torch.ones(L, L, dtype=torch.bool, device=scores.device).tril()
        maps.append(torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)[0].cpu().numpy())

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, CausalSelfAttention)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return maps


def delta_maps(model, ids) -> list:
    """Δ per layer, each (L, D_inner) float64 numpy: softplus(Δ projection + bias) at every token and channel.

    ids (1, L) int64 tensor; ``model`` a ``MambaLM``.
    """
    import torch
    import torch.nn.functional as F

    from sokhan.pipeline.models.mamba import MambaMixer

    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    maps: list = []

    def wrap(mixer):
        original = mixer._ssm_params_channel_major

        def recorded(x):
            out = original(x)
            delta, _, _, bias = out  # delta (B, D, L)
            maps.append(F.softplus(delta.double() + bias.double()[:, None])[0].T.cpu().numpy())  # (L, D)
            return out

        return recorded

    for m in mixers:
        m._ssm_params_channel_major = wrap(m)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for m in mixers:
            del m._ssm_params_channel_major  # the instance attribute goes; the class method is back
    return maps


# Characters that draw nothing, named where a token is nothing else (Persian's bare ZWNJ token is common).
INVISIBLE = {"\u200c": "ZWNJ", "\u200d": "ZWJ", "\u200e": "LRM", "\u200f": "RLM", "\u061c": "ALM", "\ufeff": "BOM"}
PART = "…"  # after a piece holding part of a character's bytes ("·" read as the Persian zero "۰" after digits)


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text for a tick label: specials by name (``<|lang:fa|>`` -> ``<fa>``), Persian shaped.

    A byte-level token may hold part of a character (a Chinese character is 3 bytes, often split in a small
    vocabulary); such a token is labelled with every character it has bytes of, followed by "…" (after, in the
    text's own direction: on the left of a Persian piece). A space is "␣", a bare ZWNJ "ZWNJ".
    """
    from sokhan.pipeline.plotting import label

    names = {i: n for n, i in tokenizer.special_tokens.items()}
    out: list[str] = []
    run: list[int] = []  # a run of ordinary tokens, labelled together so split characters can be found

    def flush() -> None:
        spans, at = [], 0
        for i in run:
            n = len(tokenizer.id_to_bytes(i))
            spans.append((at, at + n))
            at += n
        text = b"".join(tokenizer.id_to_bytes(i) for i in run).decode("utf-8", errors="replace")
        starts, at = [], 0  # byte offset of each character
        for ch in text:
            starts.append(at)
            at += len(ch.encode("utf-8")) if ch != "\ufffd" else 1
        starts.append(at)
        for a, b in spans:
            chars = [k for k in range(len(text)) if starts[k] < b and starts[k + 1] > a]
            piece = "".join(text[k] for k in chars).strip() or "␣"
            if all(c in INVISIBLE for c in piece):
                piece = "+".join(INVISIBLE[c] for c in piece)
            whole = all(a <= starts[k] and starts[k + 1] <= b for k in chars)
            out.append(label(piece + ("" if whole else PART)))  # before label: bidi puts it after a Persian piece
        run.clear()

    for i in ids:
        if i in names:
            flush()
            out.append("<" + names[i].strip("<|>").replace("lang:", "") + ">")
        else:
            run.append(i)
    flush()
    return out


MAX_TOKENS = 256  # --max-tokens at most: beyond it no label is readable, and the figures grow quadratically
MAX_INCHES = 60.0  # a figure's side at most (9000 pixels at the 150 dpi plots are saved at): memory stays bounded


def plot_attention(maps: list, labels: list[str], title: str, out: Path) -> list[Path]:
    """One PNG per layer, a heatmap per head (rows: the predicting token, columns: the tokens it attends to, both in
    text order), on one 0-1 colour scale; returns the paths. ``title``: ready to draw (``plotting.label``)."""
    import matplotlib.pyplot as plt

    from sokhan.pipeline.plotting import save, setup_fonts

    setup_fonts()
    paths = []
    L = len(labels)
    for layer, att in enumerate(maps):
        heads = att.shape[0]
        cols = min(heads, 4)
        rows = -(-heads // cols)
        size = max(3.0, min(0.32 * L + 1.0, MAX_INCHES / max(cols, rows)))  # per head; 200 tokens took 13 GB uncapped
        font = min(8.0, 0.9 * 72 * (size - 1.0) / L)  # points: what fits in a row of the heatmap
        fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False, layout="constrained")
        for h in range(rows * cols):
            ax = axes[h // cols][h % cols]
            if h >= heads:
                ax.axis("off")
                continue
            im = ax.imshow(att[h], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer} head {h}", fontsize=9)
            ax.set_xticks(range(L), labels, rotation=90, fontsize=font)
            ax.set_yticks(range(L), labels, fontsize=font)
            ax.set_xlabel("attended token")
            ax.set_ylabel("predicting token")
        fig.colorbar(im, ax=axes, label="attention weight", shrink=0.6)
        fig.suptitle(title)
        paths.append(save(fig, out / f"attention_layer{layer}.png"))
    return paths


def plot_delta(maps: list, labels: list[str], title: str, out: Path) -> Path:
    """One PNG: per layer, mean Δ over channels per token (line) above Δ per token and channel (heatmap).

    Channels start at very different time scales (Δ's bias is spread log-uniformly), which would drown the
    per-token pattern; the heatmap shows each channel's Δ relative to its own mean over the text, in log2:
    above 0, the channel takes in more of this token than usual; below, it lets the token pass. The colour scale
    ends at the 99th percentile of |log2|, the few cells beyond it drawn at its ends: scaled to the largest cell,
    most of the map was near white. ``title``: ready to draw (``plotting.label``).
    """
    import matplotlib.pyplot as plt
    import numpy as np

    from sokhan.pipeline.plotting import save, setup_fonts

    setup_fonts()
    L = len(labels)
    n = len(maps)
    width = max(6.0, min(0.45 * L + 2.5, MAX_INCHES))
    font = min(8.0, 0.9 * 72 * (width - 2.5) / L)
    fig, axes = plt.subplots(2 * n, 1, figsize=(width, min(4.2 * n, MAX_INCHES)), layout="constrained",
                             gridspec_kw={"height_ratios": [1, 3] * n}, squeeze=False)
    for layer, delta in enumerate(maps):
        line, heat = axes[2 * layer][0], axes[2 * layer + 1][0]
        line.plot(np.arange(L), delta.mean(axis=1), marker="o", color="tab:orange")
        line.set_xlim(-0.5, L - 0.5)
        line.set_xticks([])
        line.set_ylabel("mean Δ")
        line.set_title(f"layer {layer}", fontsize=9)
        rel = np.log2(delta / delta.mean(axis=0, keepdims=True)).T  # (D, L)
        lim = max(float(np.percentile(np.abs(rel), 99)), 1e-6)
        im = heat.imshow(rel, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        heat.set_xticks(range(L), labels, rotation=90, fontsize=font)
        heat.set_xlabel("token")
        heat.set_ylabel("channel")
        fig.colorbar(im, ax=heat, label="log2 Δ / channel mean", pad=0.01, extend="both")
    fig.suptitle(title)
    return save(fig, out / "delta.png")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--run-dir", type=Path, required=True, help="a run directory with finished tokenize and train stages")
    parser.add_argument("--text", required=True, help='the text to inspect, e.g. "در جنگل یک شیر درنده را دیدم"')
    parser.add_argument("--lang", choices=("fa", "zh", "en"), default=None, help="its language (default: detected)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: RUN/inspect)")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help=f"tokens to show at most (default 64, at most {MAX_TOKENS}: heatmaps get unreadable beyond)")


def main(args: argparse.Namespace) -> int:
    import torch

    from sokhan.pipeline.plotting import label
    from sokhan.pipeline.stage import ensure_dir, log, require_trained
    from sokhan.pipeline.train.checkpoint import load_model
    from sokhan.tokenization import Tokenizer, detect_language

    if not 2 <= args.max_tokens <= MAX_TOKENS:  # the language tag and at least one token of the text
        raise SokhanError(f"--max-tokens = {args.max_tokens} must be in [2, {MAX_TOKENS}] (the language tag and a token; "
                          "a heatmap of more tokens has no readable label)")
    if not args.text.strip():  # with --lang it would plot the language tag alone
        raise SokhanError(f"--text {args.text!r}: nothing to inspect; give at least one word")
    run = Path(args.run_dir)
    require_trained(run, "sokhan inspect")
    tokenizer = Tokenizer.load(run / "tokenize" / "tokenizer.json")
    lang = args.lang or detect_language(args.text)
    if lang is None:
        raise SokhanError(f"--text {args.text!r}: no letters to detect a language from; pass --lang fa|zh|en")
    ids = tokenizer.encode(args.text, lang=lang, add_special_tokens=True)[:-1]  # as a training line, without <|eos|>
    if len(ids) < 2:  # the language tag alone: the text normalized to nothing (zero-width characters)
        raise SokhanError(f"--text {args.text!r}: nothing left to inspect after normalization; give at least one word")
    if len(ids) > args.max_tokens:
        raise SokhanError(f"--text is {len(ids)} tokens; --max-tokens is {args.max_tokens} (shorten the text or raise it)")
    model, cfg = load_model(run / "train", device="cpu")
    if cfg.vocab_size != tokenizer.vocab_size:  # tokenize rerun since train: the labels would name other tokens
        raise SokhanError(
            f"{run / 'train'}: model vocabulary {cfg.vocab_size} != tokenizer vocabulary {tokenizer.vocab_size} in "
            f"{run / 'tokenize'}; the model is stale, run `sokhan run --run-dir {run}` first"
        )
    out = ensure_dir(args.out or run / "inspect", "--out")
    labels = token_labels(tokenizer, ids)
    batch = torch.as_tensor([ids], dtype=torch.int64)
    # The text shaped on its own: inside "mamba: …" the Latin prefix made bidi lay the whole title out left to right.
    title = f"{cfg.arch}: {label(tokenizer.normalize(args.text, lang))}"
    if cfg.arch == "transformer":
        paths = plot_attention(attention_maps(model, batch), labels, title, out)
    else:
        paths = [plot_delta(delta_maps(model, batch), labels, title, out)]
    for p in paths:
        log(f"inspect: wrote {p}")
        print(p)
    return 0
