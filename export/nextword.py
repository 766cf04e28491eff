"""Next-*word* prediction from a next-*token* model: a small beam search over subword continuations.

numpy only (no torch), so the exported runtime and the evaluation stage share it. The model is reached through
one callable, ``step_fn(ids (B,) int64, state) -> (logits (B, V), new_state)``, that must not modify ``state`` in
place (the search branches from one state into several hypotheses). ONNX Runtime's step is functional already; a
PyTorch ``model.step`` must be wrapped with a clone of the state.

What a word is. The prompt is taken to end where a word may start. The continuation's text (decoded from the
continuation tokens alone, leading whitespace stripped) is cut into words by the tokenizer's own segmenter
(``Tokenizer.segment``: jieba for Chinese, hazm for Persian, runs of word characters and runs of punctuation
otherwise), so a word here is a piece the subword model never merges across; a punctuation run is a word of its
own. A hypothesis is finished when its text holds a word boundary after the first word (a second word has
started, or whitespace follows the first) or when it emits ``<|eos|>``; its word is the first segment. Text that
ends inside a multi-byte character (a trailing U+FFFD from byte-level decoding) is never finished. Different token
paths that give the same word add their probabilities: the model's probability of that next word, up to the beam.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

StepFn = Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]
Splitter = Callable[[str], list[str]]


class TokenizerLike(Protocol):
    special_tokens: dict[str, int]

    def decode(self, ids: Sequence[int]) -> str: ...

    def segment(self, text: str, lang: str) -> list[str]: ...


@dataclass
class _Hypothesis:
    logprob: float
    ids: tuple[int, ...]
    logits: np.ndarray  # (V,) the model's next-token logits after ``ids``
    state: Any


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def default_splitter(tokenizer: Any, lang: str | None) -> Splitter:
    """Words of a text: ``tokenizer.segment`` (jieba for zh, hazm for fa, word/punctuation runs otherwise) with the
    whitespace it attaches to a word's front removed and whitespace-only pieces dropped.

    ``lang`` None: detected from each text by script (``sokhan.tokenization.detect_language``, else ``en``).
    """
    from sokhan.tokenization import detect_language

    def split(text: str) -> list[str]:
        pieces = tokenizer.segment(text, lang or detect_language(text) or "en")
        return [p.strip() for p in pieces if p.strip()]

    return split


INVALID = "\ufffd"  # what byte-level decoding gives for bytes that are not (yet) valid UTF-8


def first_word(text: str, split: Splitter, final: bool) -> str | None:
    """The first word of a continuation once a boundary follows it (or ``final``: nothing more will come).

    ``text`` is the decoded continuation. Returns None while the first word may still grow. Text with U+FFFD
    before its end cannot become valid UTF-8 by growing; ``first_word`` returns ``INVALID`` for it, and at the
    end only once ``final``.
    """
    body = text.lstrip()
    if INVALID in body[:-1] or (final and body.endswith(INVALID)):
        return INVALID
    if not body or body.endswith(INVALID):
        return None
    pieces = split(body)
    if not pieces:
        return None
    if final or len(pieces) >= 2 or body != body.rstrip():
        return pieces[0]
    return None


def prime(step_fn: StepFn, state: Any, ids: Sequence[int]) -> tuple[np.ndarray, Any]:
    """Feed ``ids`` one at a time from ``state``; returns the last logits (V,) and the state after them."""
    if not ids:
        raise ValueError("prime needs at least one token")
    logits = None
    for i in ids:
        logits, state = step_fn(np.array([i], dtype=np.int64), state)
    return np.asarray(logits)[0], state


def next_words(
    step_fn: StepFn,
    state: Any,
    logits: np.ndarray,
    tokenizer: TokenizerLike,
    *,
    k: int = 5,
    lang: str | None = None,
    beam: int = 8,
    max_tokens: int = 8,
    min_prob: float = 1e-6,
    split: Splitter | None = None,
) -> list[tuple[str, float]]:
    """The ``k`` most likely next words and their probabilities, most likely first.

    ``logits`` (V,) is the next-token distribution after the prompt and ``state`` the model state that produced
    it. Each round extends the ``beam`` best unfinished hypotheses by their ``beam`` best tokens; a hypothesis
    longer than ``max_tokens`` tokens without a boundary, or less likely than ``min_prob``, is dropped. The
    probabilities are lower bounds (mass outside the beam is not counted), so they need not sum to 1.
    """
    if k < 1 or beam < 1 or max_tokens < 1 or not 0.0 < min_prob < 1.0:
        raise ValueError("k, beam and max_tokens must be >= 1 and min_prob in (0, 1)")
    split = split or default_splitter(tokenizer, lang)
    specials = tokenizer.special_tokens
    eos = specials.get("<|eos|>")
    banned = np.array([i for name, i in specials.items() if name != "<|eos|>"], dtype=np.int64)

    floor = math.log(min_prob)
    found: dict[str, float] = {}
    frontier = [_Hypothesis(0.0, (), np.asarray(logits, dtype=np.float32).reshape(-1), state)]
    for depth in range(max_tokens):
        candidates: list[tuple[float, int, int]] = []  # (logprob, hypothesis index, token)
        for h_index, hyp in enumerate(frontier):
            x = hyp.logits.astype(np.float64)
            x[banned] = -np.inf  # language tags, bos and pad never occur inside a line: renormalise without them
            lp = log_softmax(x)
            top = np.argpartition(-lp, min(beam, lp.size - 1))[:beam]
            candidates.extend((hyp.logprob + float(lp[t]), h_index, int(t)) for t in top if hyp.logprob + lp[t] >= floor)
        next_frontier: list[_Hypothesis] = []
        for logprob, h_index, token in heapq.nlargest(beam * beam, candidates):
            hyp = frontier[h_index]
            final = token == eos
            ids = hyp.ids if final else hyp.ids + (token,)
            word = first_word(tokenizer.decode(list(ids)), split, final=final) if ids else None
            if word == INVALID:
                continue
            if word is not None:
                found[word] = found.get(word, 0.0) + math.exp(logprob)
            elif not final and len(next_frontier) < beam and depth + 1 < max_tokens:
                out, new_state = step_fn(np.array([token], dtype=np.int64), hyp.state)
                next_frontier.append(_Hypothesis(logprob, ids, np.asarray(out)[0], new_state))
        frontier = next_frontier
        if not frontier:
            break
    return sorted(found.items(), key=lambda kv: -kv[1])[:k]
