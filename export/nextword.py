"""Next-*word* prediction from a next-*token* model: a small beam search over subword continuations.

numpy only (no torch), so the exported runtime and the evaluation stage share it. The model is reached through
two callables: ``step_fn(ids (B,) int64, state) -> (logits (B, V), new_state)`` and ``take(state, rows) -> state``,
which gathers rows of a batched state (the search branches one state into several hypotheses). Every hypothesis
of a round goes through one batched step, so a search of depth d costs d model calls, not up to d · beam.

What a word is. The prompt is taken to end where a word may start, except that in a language written with spaces
(not Chinese) a prompt ending in a letter, digit, mark or ZWNJ has its last word unfinished: a continuation glued
onto it (``کتاب`` + ``ها``, ``The weath`` + ``ing``) extends that word and is no next word, so there only
continuations that begin with whitespace or punctuation count (``after_word``). The continuation's text (decoded from the
continuation tokens alone, leading whitespace stripped) is cut into words by the tokenizer's own segmenter
(``Tokenizer.segment``: jieba for Chinese, hazm for Persian, runs of word characters and runs of punctuation
otherwise), so a word here is a piece the subword model never merges across; a punctuation run is a word of its
own. A hypothesis is finished when its text holds a word boundary after the first word (a second word has
started, or whitespace follows the first) or when it emits ``<|eos|>``; its word is the first segment. Chinese has
no spaces, and jieba cuts a word it has not seen whole (``织田信`` → ``织田 | 信``): while the text is the start of
a longer word in jieba's dictionary (``Tokenizer.word_may_grow``), a second segment does not finish it. Such a
hypothesis is counted for its first segment at once and searched on; the share of its descendants that settle on
another word (``织田信长``) moves there, and what the search does not follow stays with the first segment. Text that
ends inside a multi-byte character (a trailing U+FFFD from byte-level decoding) is never finished. Different token
paths that give the same word add their probabilities: the model's probability of that next word, up to the beam.
"""

from __future__ import annotations

import heapq
import math
import unicodedata
from typing import Any, Callable, Protocol, Sequence

import numpy as np

StepFn = Callable[[np.ndarray, Any], tuple[np.ndarray, Any]]
TakeFn = Callable[[Any, np.ndarray], Any]
Splitter = Callable[[str], list[str]]


class TokenizerLike(Protocol):
    special_tokens: dict[str, int]

    def decode(self, ids: Sequence[int]) -> str: ...

    def segment(self, text: str, lang: str) -> list[str]: ...

    # Optional: ``word_may_grow(text, lang) -> bool`` (see ``default_grows``).


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


def default_grows(tokenizer: Any, lang: str | None) -> Callable[[str], bool]:
    """Whether more text could lengthen a continuation's first word although a second segment follows it:
    ``tokenizer.word_may_grow`` (Chinese dictionary prefixes), never for a tokenizer without it."""
    may_grow = getattr(tokenizer, "word_may_grow", None)
    if may_grow is None:
        return lambda text: False
    from sokhan.tokenization import detect_language

    return lambda text: may_grow(text, lang or detect_language(text) or "en")


INVALID = "\ufffd"  # what byte-level decoding gives for bytes that are not (yet) valid UTF-8


def first_word(text: str, split: Splitter, final: bool, grows: Callable[[str], bool] | None = None) -> str | None:
    """The first word of a continuation once a boundary follows it (or ``final``: nothing more will come).

    ``text`` is the decoded continuation. Returns None while the first word may still grow: no boundary yet, or
    only a segment boundary while ``grows(text)`` says more text could move it (see ``default_grows``). Text with
    U+FFFD before its end cannot become valid UTF-8 by growing; ``first_word`` returns ``INVALID`` for it, and at
    the end only once ``final``.
    """
    body = text.lstrip()
    if INVALID in body[:-1] or (final and body.endswith(INVALID)):
        return INVALID
    if not body or body.endswith(INVALID):
        return None
    pieces = split(body)
    if not pieces:
        return None
    if final or body != body.rstrip():
        return pieces[0]
    if len(pieces) >= 2 and not (grows is not None and grows(body)):
        return pieces[0]
    return None


def ends_inside_word(text: str, lang: str | None) -> bool:
    """Whether text glued onto ``text`` would extend its last word: it ends in a letter, digit, combining mark or
    ZWNJ, in a language that writes spaces between words (Chinese does not: any character may start a word)."""
    if lang == "zh" or not text:
        return False
    c = text[-1]
    return c.isalnum() or c == "\u200c" or unicodedata.category(c).startswith("M")


def starts_new_word(text: str) -> bool | None:
    """Whether a continuation's text begins a word of its own after a prompt that ends inside one: with whitespace,
    punctuation or a symbol. None while that cannot be told (no text yet, or a partial UTF-8 character)."""
    if not text or text[0] == INVALID:
        return None
    return text[0].isspace() or unicodedata.category(text[0])[0] in "PS"


def next_words(
    step_fn: StepFn,
    state: Any,
    logits: np.ndarray,
    tokenizer: TokenizerLike,
    *,
    take: TakeFn,
    k: int = 5,
    lang: str | None = None,
    beam: int = 8,
    max_tokens: int = 8,
    min_prob: float = 1e-6,
    split: Splitter | None = None,
    grows: Callable[[str], bool] | None = None,
    after_word: bool = False,
) -> list[tuple[str, float]]:
    """The ``k`` most likely next words and their probabilities, most likely first.

    ``logits`` (V,) is the next-token distribution after the prompt and ``state`` the (batch 1) model state that
    produced it. Each round extends the ``beam`` best unfinished hypotheses by their ``beam`` best tokens; a
    hypothesis longer than ``max_tokens`` tokens without a boundary, or less likely than ``min_prob``, is dropped.
    The probabilities are lower bounds (mass outside the beam is not counted), so they need not sum to 1.

    The hypotheses of a round are one batch: ``take(state, rows)`` builds the state whose row i is row
    ``rows[i]`` of ``state`` (rows may repeat; a new state, ``state`` untouched), and one ``step_fn`` call
    extends them all. ``step_fn`` only ever sees states made by ``take`` and never reused, so it may update
    them in place.

    ``split`` and ``grows`` default to ``default_splitter`` and ``default_grows`` of ``tokenizer`` and ``lang``.
    ``after_word``: the prompt ends inside a word (``ends_inside_word``); continuations that do not start with
    whitespace or punctuation are dropped, neither counted nor extended.
    """
    if k < 1 or beam < 1 or max_tokens < 1 or not 0.0 < min_prob < 1.0:
        raise ValueError("k, beam and max_tokens must be >= 1 and min_prob in (0, 1)")
    split = split or default_splitter(tokenizer, lang)
    grows = grows or default_grows(tokenizer, lang)
    specials = tokenizer.special_tokens
    eos = specials.get("<|eos|>")
    banned = np.array([i for name, i in specials.items() if name != "<|eos|>"], dtype=np.int64)

    floor = math.log(min_prob)
    found: dict[str, float] = {}

    def move(mass: float, owner: str | None, word: str) -> None:  # count mass under word, not owner any more
        if owner is not None:
            found[owner] -= mass
        found[word] = found.get(word, 0.0) + mass

    # The frontier: per hypothesis its log-probability, tokens and ``owner``, the word its mass is already counted
    # under (a segment boundary that ``grows`` holds open counts the hypothesis for its first segment at once, so
    # that what the search cannot follow further, past the beam or max_tokens, is not lost; a descendant that
    # settles on another word moves its share there). Its logits and state are rows of a batch.
    scores, paths, owners = [0.0], [()], [None]
    batch_logits = np.asarray(logits, dtype=np.float32).reshape(1, -1)
    for depth in range(max_tokens):
        x = batch_logits.astype(np.float64)
        x[:, banned] = -np.inf  # language tags, bos and pad never occur inside a line: renormalise without them
        lp = log_softmax(x)
        width = min(beam, lp.shape[-1] - 1)
        top = np.argpartition(-lp, width, axis=-1)[:, :beam]
        candidates = [  # (logprob, hypothesis index, token)
            (scores[h] + float(lp[h, t]), h, int(t)) for h in range(len(paths)) for t in top[h] if scores[h] + lp[h, t] >= floor
        ]
        parents, tokens, next_scores, next_paths, next_owners = [], [], [], [], []
        for logprob, h, token in heapq.nlargest(beam * beam, candidates):
            final = token == eos
            ids = paths[h] if final else paths[h] + (token,)
            text = tokenizer.decode(list(ids)) if ids else ""
            if after_word and starts_new_word(text) is False:
                continue  # the rest of the prompt's last word, not a word of its own
            word = first_word(text, split, final=final, grows=grows) if ids else None
            if word == INVALID:
                continue
            owner = owners[h]
            if word is None and not final and ids:
                held = first_word(text, split, final=False)  # a boundary that only ``grows`` keeps open
                if held is not None and held != INVALID and held != owner:
                    move(math.exp(logprob), owner, held)
                    owner = held
            if word is not None:
                if word != owner:
                    move(math.exp(logprob), owner, word)
            elif not final and len(parents) < beam and depth + 1 < max_tokens:
                parents.append(h)
                tokens.append(token)
                next_scores.append(logprob)
                next_paths.append(ids)
                next_owners.append(owner)
        if not parents:
            break
        out, state = step_fn(np.array(tokens, dtype=np.int64), take(state, np.array(parents, dtype=np.int64)))
        batch_logits, scores, paths, owners = np.asarray(out), next_scores, next_paths, next_owners
    # A word whose whole count moved on keeps a rounding residue (~1e-17), never a probability the search found.
    kept = [(w, p) for w, p in found.items() if p > min_prob * 1e-6]
    return sorted(kept, key=lambda kv: -kv[1])[:k]
