"""Scoring a language model on a token stream: sliding-window NLL, next-token ranks and next-word accuracy.

Everything here is model-agnostic: the neural model comes in as ``forward(ids (B, L)) -> logits (B, L, V)`` for
the token-level figures and as ``ModelFns`` (numpy step / advance) for next-word search; the n-gram model is
scored by its own ``score``, and both go through ``summarize``.

What is scored. A text is a list of normalized lines of one language, encoded as the training shards are:
``<|lang:xx|>`` + tokens + ``<|eos|>`` per line, lines concatenated into one stream. Every token of the stream
except the ``<|lang:xx|>`` tags is predicted, the ``<|eos|>`` that ends each line included (the tag is given, the
end of the line is not). Characters are those of the normalized lines plus one per line for its end (the newline
that ``<|eos|>`` stands for), so bits per character = (sum of NLL over predicted tokens) / ln 2 / characters.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

TOPK = 5


@dataclass
class EncodedText:
    """One language's text as a token stream, with what is predicted in it."""

    lang: str
    lines: list[str]  # normalized, non-empty
    tokens: np.ndarray  # (T,) int64: per line <|lang|> + ids + <|eos|>
    line_starts: np.ndarray  # (n_lines + 1,) int64: line i is tokens[line_starts[i]:line_starts[i + 1]]
    targets: np.ndarray  # (P,) int64: positions whose token is predicted (all but the <|lang|> tags)
    chars: int
    words: int  # segmenter words holding a letter or digit


def splitter(tokenizer, lang: str) -> Callable[[str], list[str]]:
    """Words of a text in ``lang``: the splitter next-word prediction uses (``sokhan.export.nextword``)."""
    from sokhan.export.nextword import default_splitter

    return default_splitter(tokenizer, lang)


def is_word(piece: str) -> bool:
    """A word holds a letter or digit; punctuation pieces are not counted or scored as words."""
    return any(c.isalnum() for c in piece)


def encode_lines(tokenizer, lines: Sequence[str], lang: str, max_tokens: int | None = None,
                 split: Callable[[str], list[str]] | None = None) -> EncodedText:
    """Encode normalized ``lines`` of ``lang``; stops before the line that would pass ``max_tokens`` predicted tokens.

    Empty lines are dropped (the tokenize stage writes none). At least one line is kept.
    """
    split = split or splitter(tokenizer, lang)
    specials = tokenizer.special_tokens
    tag, eos = specials[f"<|lang:{lang}|>"], specials["<|eos|>"]
    stream: list[int] = []
    starts = [0]
    kept: list[str] = []
    n_pred = 0
    for line in lines:
        if not line.strip():
            continue
        ids = tokenizer.encode_normalized(line, lang)
        if max_tokens is not None and kept and n_pred + len(ids) + 1 > max_tokens:
            break
        stream += [tag, *ids, eos]
        starts.append(len(stream))
        kept.append(line)
        n_pred += len(ids) + 1
    tokens = np.array(stream, dtype=np.int64)
    is_tag = np.zeros(len(tokens), bool)
    is_tag[np.array(starts[:-1], dtype=np.int64)] = True
    return EncodedText(
        lang=lang,
        lines=kept,
        tokens=tokens,
        line_starts=np.array(starts, dtype=np.int64),
        targets=np.flatnonzero(~is_tag),
        chars=sum(len(s) for s in kept) + len(kept),
        words=sum(sum(map(is_word, split(s))) for s in kept),
    )


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over a stream of ``n`` tokens: (start, end, first) with targets first .. end-1 scored.

    Each target position p in 1 .. n-1 is scored exactly once, in the first window that reaches it; every window
    after the first scores only its last ``stride`` positions (window - 1 when stride = window), so each of those
    sees ≥ window - stride tokens of context (the first window's targets see all tokens before them).
    """
    if window < 2:  # a window of one token holds no context to predict its successor from (and never advanced)
        raise ValueError(f"window = {window} must be ≥ 2")
    if not 0 < stride <= window:
        raise ValueError(f"stride = {stride} must be in (0, window = {window}]")
    out: list[tuple[int, int, int]] = []
    start, done = 0, 1
    while done < n:
        end = min(start + window, n)
        out.append((start, end, done))
        done = end
        start = min(start + stride, done - 1)  # the first target's predecessor must be inside the window
    return out


def score_windows(
    forward: Callable,
    tokens: np.ndarray,
    window: int,
    stride: int,
    batch_size: int = 8,
    topk: int = TOPK,
) -> tuple[np.ndarray, np.ndarray]:
    """NLL (nats, float64) and rank of every token tokens[1:] under ``forward``, scored with sliding windows.

    forward: torch (B, L) int64 -> (B, L, V) logits. Returns (nll (n-1,), rank (n-1,)) indexed by position - 1;
    rank 0 is the top prediction (ties count against the target), ranks ≥ topk are reported as topk.
    """
    import torch

    n = len(tokens)
    nll = np.full(max(n - 1, 0), np.nan)
    rank = np.full(max(n - 1, 0), topk, np.int64)
    wins = windows(n, window, stride)
    t = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    for b in range(0, len(wins), batch_size):
        group = wins[b : b + batch_size]
        length = max(e - s for s, e, _ in group)
        # Right padding is never seen by the positions that are scored: both models are causal.
        batch = torch.zeros(len(group), length, dtype=torch.int64)
        for i, (s, e, _) in enumerate(group):
            batch[i, : e - s] = t[s:e]
        with torch.no_grad():
            logits = forward(batch).double().cpu()  # (B, L, V): a GPU model's logits come back to be indexed
        logp = torch.log_softmax(logits, dim=-1)
        for i, (s, e, first) in enumerate(group):
            pos = torch.arange(first, e)  # targets, absolute positions
            lp = logp[i, pos - 1 - s]  # (P, V): the prediction made one step earlier
            tgt = lp.gather(1, t[pos].unsqueeze(1))  # (P, 1)
            nll[first - 1 : e - 1] = (-tgt[:, 0]).numpy()
            rank[first - 1 : e - 1] = ((lp >= tgt).sum(1) - 1).clamp(max=topk).numpy()
    return nll, rank


@dataclass
class Scores:
    """Per-language figures; the JSON report holds ``asdict`` of these (None where not measured)."""

    tokens: int
    characters: int
    words: int
    nll_per_token: float
    perplexity: float
    bits_per_character: float
    top1: float
    top5: float
    nextword_top1: float | None = None
    nextword_top5: float | None = None
    nextword_words: int | None = None


def summarize(text: EncodedText, nll: np.ndarray, rank: np.ndarray) -> Scores:
    """Scores from the NLL (nats) and rank at each of ``text.targets`` (arrays aligned with them)."""
    if len(nll) == 0:
        raise ValueError("summarize: no predicted tokens")  # encode_lines got no non-empty line
    total = float(np.sum(nll))
    mean = total / len(nll)
    return Scores(
        tokens=int(len(nll)),
        characters=text.chars,
        words=text.words,
        nll_per_token=mean,
        perplexity=math.exp(mean),
        bits_per_character=total / math.log(2) / text.chars,
        top1=float(np.mean(rank < 1)),
        top5=float(np.mean(rank < 5)),
    )


def word_starts(tokenizer, text: EncodedText, limit: int, split: Callable[[str], list[str]] | None = None) -> list[tuple[int, str]]:
    """Up to ``limit`` (position, gold word) pairs, spread evenly over the text: stream positions where a word
    starts, and that word.

    A position starts a word when the text of its line's tokens before it ends at a boundary of the segmenter's
    words (whitespace after the boundary is skipped, as ``nextword.first_word`` strips it) and not inside a
    multi-byte character; where whitespace is a token of its own, the position before it. The gold word is the
    first word of the rest of the line, cut by the same ``nextword.first_word``. Spread evenly (every k-th word
    start), not the first ``limit``, so that the figure covers all of the text.
    """
    from sokhan.export.nextword import first_word

    split = split or splitter(tokenizer, text.lang)
    candidates: list[tuple[int, str, int]] = []  # (position, its line's text, where in it the word starts)
    for i in range(len(text.lines)):
        a, b = int(text.line_starts[i]) + 1, int(text.line_starts[i + 1]) - 1  # the line's own tokens [a, b)
        pieces = [tokenizer.id_to_bytes(t) for t in text.tokens[a:b].tolist()]
        full = b"".join(pieces).decode("utf-8", errors="replace")
        candidates += [(a + j, full, at) for j, at in _starts_in_line(pieces, full, split)]
    if len(candidates) > limit:  # every k-th, then the gold word of those alone (a segmentation each)
        candidates = [candidates[k] for k in np.unique(np.linspace(0, len(candidates) - 1, limit).round().astype(np.int64))]
    out = []
    for position, full, at in candidates:
        gold = first_word(full[at:], split, final=True)
        if gold and is_word(gold):
            out.append((position, gold))
    return out


def _starts_in_line(pieces: list[bytes], full: str, split: Callable[[str], list[str]]) -> list[tuple[int, int]]:
    """(token index j, character index) for each word of ``full`` (the line, ``pieces`` its tokens' bytes) that a
    token starts at or before, skipping whitespace; the first such token only.

    Byte-level tokens: a prefix's text is its bytes decoded, whole characters only where its byte length falls on
    a character boundary. Lengths, not a decode per prefix (that is quadratic on a long Chinese line).
    """
    char_at, offset = {0: 0}, 0  # byte offset of each character boundary -> character index
    for n, ch in enumerate(full):
        offset += len(ch.encode())
        char_at[offset] = n + 1
    word_at, cursor = {}, 0  # character index where a segmenter word starts -> the word
    for w in split(full):
        at = full.find(w, cursor)
        if at < 0:
            break
        word_at[at] = w
        cursor = at + len(w)
    skip, visible = [0] * (len(full) + 1), len(full)  # the first non-space character at or after each index
    for n in range(len(full), -1, -1):
        if n < len(full) and not full[n].isspace():
            visible = n
        skip[n] = visible
    out, taken, offset = [], set(), 0
    for j, piece in enumerate(pieces):
        at = char_at.get(offset)
        offset += len(piece)
        if at is None:
            continue  # inside a multi-byte character
        at = skip[at]
        # A space token of its own gives a second position before the same word: the first one counts.
        if at not in taken and is_word(word_at.get(at, "")):
            taken.add(at)
            out.append((j, at))
    return out


def nextword_ranks(
    model: "ModelFns",
    tokenizer,
    text: EncodedText,
    positions: list[tuple[int, str]],
    window: int,
    k: int = TOPK,
    beam: int = 8,
    max_tokens: int = 8,
    split: Callable[[str], list[str]] | None = None,
) -> np.ndarray:
    """Rank of the gold word among the model's ``k`` best next words at each (position, word); k if absent.

    The words come from ``sokhan.export.nextword.next_words`` (beam search over subword continuations, the same
    search the exported runtime uses). The state is carried along the stream and rebuilt from the last
    ``window // 2`` tokens whenever it would hold more than ``window - max_tokens`` tokens, so that with the
    search's own steps a transformer's cache (``window`` ≤ its ``max_seq_len``) never overflows.
    """
    from sokhan.export.nextword import ends_inside_word, next_words

    # The search segments every candidate continuation, and the same short ones (" the", "的") recur at every
    # word start: segmentation (hazm, jieba) is most of its cost unless remembered.
    split = functools.lru_cache(maxsize=1 << 16)(split or splitter(tokenizer, text.lang))
    ranks = np.full(len(positions), k, np.int64)
    state, fed, logits = None, 0, None  # fed: how many tokens ``state`` has consumed (None: a fresh start)
    p = 0  # the state has seen tokens[:p] (its last ``fed`` of them)
    for i, (target, gold) in enumerate(positions):
        if fed + target - p > window - max_tokens:
            state, fed = None, 0
            p = max(0, target - window // 2)
        logits, state = model.advance(text.tokens[p:target], state)
        fed, p = fed + target - p, target
        line = int(np.searchsorted(text.line_starts, target, side="right")) - 1
        before = tokenizer.decode(text.tokens[text.line_starts[line] + 1 : target].tolist())  # the line so far
        found = next_words(model.step, state, logits, tokenizer, take=model.take, k=k, beam=beam, max_tokens=max_tokens,
                           lang=text.lang, split=split, after_word=ends_inside_word(before, text.lang))
        words = [w for w, _ in found]
        if gold in words:
            ranks[i] = words.index(gold)
    return ranks


@dataclass
class ModelFns:
    """A PyTorch model seen through numpy: what next-word search needs.

    step(ids (B,), state) -> (logits (B, V), new state), free to update ``state`` in place (next-word search only
    steps states that ``take`` made); take(state, rows) -> the state of rows ``rows`` of ``state`` (a new state);
    advance(ids (T,), state) -> (logits (V,) after the last id, state) consumes a chunk of one sequence in one
    parallel pass (``state`` None: from a fresh state, which a recurrent model need not carry a zero state into).
    """

    init_state: Callable[[], Any]
    step: Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]
    advance: Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]
    take: Callable[[Any, np.ndarray], Any]


def torch_fns(model) -> ModelFns:
    import torch

    param = next(model.parameters())

    def init_state():
        return model.init_state(1, param.device, param.dtype)

    def step(ids: np.ndarray, state):
        with torch.no_grad():
            logits, state = model.step(torch.as_tensor(ids, dtype=torch.int64, device=param.device), state)
        return logits.float().cpu().numpy(), state

    def take(state, rows: np.ndarray):
        return state.take(torch.as_tensor(rows, dtype=torch.int64, device=param.device))

    def advance(ids: np.ndarray, state):
        with torch.no_grad():
            logits, state = model.prefill(torch.as_tensor(np.asarray(ids)[None], dtype=torch.int64, device=param.device), state)
        return logits[0, -1].float().cpu().numpy(), state

    return ModelFns(init_state, step, advance, take)


def ngram_fns(ngram) -> ModelFns:
    """A ``KneserNey`` model seen as ``ModelFns``, so that next-word search runs on it as on a neural model.

    The state is a batch: per row the last ``order - 1`` tokens; logits are log-probabilities.
    """
    keep = max(ngram.order - 1, 0)

    def last(history: tuple) -> tuple:
        return history[-keep:] if keep else ()

    def logits(history: tuple) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(ngram.distribution(history))

    def step(ids: np.ndarray, state):
        rows = [last(h + (int(i),)) for h, i in zip(state, np.asarray(ids).reshape(-1), strict=True)]
        return np.stack([logits(h) for h in rows]), rows

    def advance(ids: np.ndarray, state):
        (history,) = state if state is not None else [()]
        history = last(history + tuple(int(i) for i in ids))
        return logits(history), [history]

    def take(state, rows: np.ndarray):
        return [state[int(r)] for r in rows]

    return ModelFns(lambda: [()], step, advance, take)

