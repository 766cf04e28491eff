"""Language-aware segmentation that keeps every character: ``"".join(segment(t, lang)) == t``, and the same for
``pretokenize``, whose pieces the subword model never merges across (they decide what a token can span).

- ``zh``: jieba's precise mode (``jieba.Tokenizer`` instance with its bundled dictionary). ``zh_hmm`` (default off)
  lets jieba's HMM glue characters missing from the dictionary into new words (names, transliterations); off, they
  stay single characters. Off is ~15 % faster (1.06 vs 0.88 MB/s on CMRC) and, with jieba's words as the model's
  pieces, compresses the same: 1.184 vs 1.186 characters per token on held-out Chinese at 8k vocabulary (plain BPE).
- ``fa``: hazm's ``WordTokenizer`` (``join_verb_parts=False``: joining verb parts would rewrite spaces as ``_``).
  Words keep their inner ZWNJ (``کتاب‌ها`` is one word). hazm may rewrite a token, so its tokens are only *located*
  in the original text; characters it changed or dropped stay in the output as pieces of their own.
- ``en`` (and any other language): runs of word characters, runs of other non-space characters.

Whitespace before a word is attached to it (`` word``, as GPT-2's byte-level BPE does), so a space costs no token
of its own. Spans are computed against the original text and the pieces are slices of it: nothing is lost.

``segment`` gives *words* (what next-word prediction predicts); ``pretokenize`` gives the pieces the subword model
sees: the same words by default. Under jieba's words a token never spans two words, so every word boundary is a
token boundary and next-word prediction is well defined; the price is compression, since a token is never longer
than a word (1.67 characters on average). With the tokenize stage's defaults (pruned BPE, Chinese text weighted
2, vocabulary 8000) held-out Chinese gets 1.234 characters per token against SentencePiece's 1.221 (which merges
across words). ``zh_pretokenize = "runs"`` gives the model runs of word characters and runs of punctuation
instead, as for English, and lets it learn its own units inside them: 1.288 characters per token (4 % fewer
tokens), but 7 % of jieba's word boundaries then fall inside a token. Character-level BPE with byte fallback
under jieba (weights 1) reached 1.180-1.190 on Chinese, no better than byte-level BPE's 1.185, and lost 1-2 % on
Persian: its 256 fallback tokens and a character alphabet cost vocabulary that byte-level merges spend better.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from typing import Literal

from sokhan import SokhanError

_LATIN_PIECE = re.compile(r"\w+|[^\w\s]+|\s+")


@dataclass(frozen=True)
class SegmenterConfig:
    """Segmentation settings, stored beside the tokenizer in ``segmenter.json``."""

    zh_hmm: bool = False
    """jieba's HMM for words missing from its dictionary (see the module docstring)."""
    zh_pretokenize: Literal["runs", "jieba"] = "jieba"
    """Chinese pieces for the subword model: word-character runs (merges may cross words) or jieba's words."""

    def __post_init__(self) -> None:
        if self.zh_pretokenize not in ("runs", "jieba"):
            raise SokhanError(f"segmenter: zh_pretokenize = {self.zh_pretokenize!r} must be 'runs' or 'jieba'")

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def _jieba():
    """One ``jieba.Tokenizer`` per process; its prefix dictionary loads in ~0.7 s (cached in the temp dir)."""
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    tk = jieba.Tokenizer()
    tk.initialize()
    return tk


@functools.lru_cache(maxsize=1)
def _hazm_words():
    import hazm

    return hazm.WordTokenizer(join_verb_parts=False)


def preload(lang: str) -> None:
    """Load the segmenter of ``lang`` now (before forking workers, so that they share it)."""
    if lang == "zh":
        _jieba()
    elif lang == "fa":
        _hazm_words()


def _align(text: str, tokens: list[str]) -> list[str]:
    """Slices of ``text`` covering it exactly: each token where it occurs next, whatever lies between on its own."""
    out: list[str] = []
    pos = 0
    for tok in tokens:
        if not tok:
            continue
        at = text.find(tok, pos)
        if at < 0:
            continue  # rewritten by the segmenter; its characters fall into the next gap
        if at > pos:
            out.extend(m.group() for m in _LATIN_PIECE.finditer(text, pos, at))
        out.append(text[at : at + len(tok)])
        pos = at + len(tok)
    if pos < len(text):
        out.extend(m.group() for m in _LATIN_PIECE.finditer(text, pos))
    return out


def _attach_spaces(pieces: list[str]) -> list[str]:
    """Whitespace pieces become the prefix of the next piece (a trailing one stays alone)."""
    out: list[str] = []
    pending = ""
    for p in pieces:
        if p.isspace():
            pending += p
        else:
            out.append(pending + p)
            pending = ""
    if pending:
        out.append(pending)
    return out


def segment(text: str, lang: str, config: SegmenterConfig = SegmenterConfig()) -> list[str]:
    """Pieces of ``text`` (language ``lang``) whose concatenation is exactly ``text``."""
    if not text:
        return []
    if lang == "zh":
        tokens = list(_jieba().cut(text, HMM=config.zh_hmm))
    elif lang == "fa":
        tokens = _hazm_words().tokenize(text)
    else:
        return _attach_spaces(_LATIN_PIECE.findall(text))
    # jieba returns slices already; hazm mostly does. _align makes both exact.
    return _attach_spaces(_align(text, tokens))


def may_grow(text: str, lang: str) -> bool:
    """Whether more text after ``text`` could make jieba read its first word longer: ``text`` is the start of a
    word in jieba's dictionary (or a whole one). ``织田信`` is cut ``织田 | 信`` until ``长`` makes it ``织田信长``;
    written without spaces, Chinese gives no other sign that a word has ended. False for other languages."""
    if lang != "zh" or not text:
        return False
    return text in _jieba().FREQ  # jieba keeps every prefix of its words there (count 0 unless a word itself)


def pretokenize(text: str, lang: str, config: SegmenterConfig = SegmenterConfig()) -> list[str]:
    """Pieces of ``text`` for the subword model (it never merges across them); they concatenate to ``text``."""
    if lang == "zh" and config.zh_pretokenize == "runs":
        return _attach_spaces(_LATIN_PIECE.findall(text))
    return segment(text, lang, config)


def words(pieces: list[str]) -> int:
    """How many of ``pieces`` are words (contain a letter or digit), for tokens-per-word figures."""
    return sum(1 for p in pieces if any(c.isalnum() for c in p))
