"""One line of raw text -> its normalized form, per language.

Every language: control characters are dropped (the whitespace ones become spaces), invisible formatting
characters that carry no meaning here (BOM, zero-width space, soft hyphen, bidi marks and embeddings) are dropped,
whitespace runs become one space and the ends are trimmed. A multi-line text comes out as one line. Kept on
purpose: ZWNJ (U+200C, part of Persian spelling) and ZWJ (U+200D, emoji sequences).

Persian (``fa``): NFKC, then hazm 0.10's ``Normalizer`` steps, except two that mangle text:

- ``correct_spacing`` re-tokenizes the line and rewrites punctuation spacing: decimals (``3.14`` -> ``۳ ٫ ۱۴``),
  dates (``۱۳۹۹/۰۱/۰۱`` -> ``۱۳۹۹ / ۰۱ / ۰۱``), URLs and e-mail addresses come out broken. Its dictionary-driven
  ``token_spacing`` also glues whole phrases (``ازدواج کرده`` -> ``ازدواج‌کرده``) and, in poetry, the standalone
  words ``ای`` ("O") and ``گر`` ("if") onto the word before them (``است ای`` -> ``است‌ای``; 765 suffix joins in
  Hafez, many of them wrong).
- ``persian_numbers`` also rewrites digits inside Latin words (``B2`` -> ``B۲``).

Kept from hazm: Arabic -> Persian letters (ي -> ی, ك -> ک, presentation forms -> letters), Persian quotes and decimal
separator (``persian_style``), diacritics removal (configurable), removal of Quranic marks, ligature expansion
(﷽, ﷲ), squeezing of letters repeated three or more times, and the dictionary-checked ``می``/``نمی`` prefix join
(``میخواهم`` -> ``می‌خواهم``, ``میز`` stays). ZWNJ fixes (ours, conservative): tatweel (ـ) removed; ZWNJ runs
squeezed to one and a ZWNJ kept only between two Arabic-script characters; a detached ``می``/``نمی`` joined to the
next word when hazm's verb list knows the result (``می روم`` -> ``می‌روم``; ``ساقی بیار می``, "wine", stays); the
plural suffix ``ها``/``های``/``هایی`` joined to the word before it (``کتاب ها`` -> ``کتاب‌ها``, ``شاخههای`` ->
``شاخه‌های``); the clitics ``ام ات اش ایم اید اند`` joined after a word ending in ``ه`` (``شده اند`` -> ``شده‌اند``).
Digits (``digits``): ``persian`` turns Arabic-Indic ٠-٩ into ۰-۹ and Latin 0-9 into ۰-۹ except inside Latin words
(``B2``, ``mp3`` stay), % into ٪; ``latin`` turns Persian and Arabic-Indic digits into 0-9; ``keep`` leaves them.

Chinese (``zh``): NFKC *except* the full-width punctuation that Chinese typography uses: ，。！？：；（）「」『』【】
《》、～ and the rest of U+FF01-FF0F, FF1A-FF20, FF3B-FF40, FF5B-FF60, the full-width currency signs FFE0-FFE6, and
… ‥ stay as they are (NFKC would turn ``，`` into ``,``, ``……`` into ``......``, and a Chinese comma into a Latin one
that jieba and the tokenizer treat differently). Everything else gets NFKC: full-width Latin letters and digits
become ASCII (``ＡＢＣ１２３`` -> ``ABC123``), half-width katakana and half-width CJK punctuation (｡ ｢ ｣ ､) become
full-width, compatibility ideographs become their unified forms, the ideographic space becomes a space.

English (``en``) and anything else: NFKC.

``normalize`` is idempotent (a test checks it on every line of the real corpora and on arbitrary Unicode), so text
that was normalized once (``RUN/normalize``) encodes to the same tokens whether or not it is normalized again.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Literal

Digits = Literal["persian", "latin", "keep"]

# Invisible format characters that only get in the way: soft hyphen, Arabic letter mark, zero-width space,
# LRM/RLM, bidi embeddings/overrides/isolates, word joiner and invisible operators, BOM. Not ZWNJ/ZWJ.
_INVISIBLE = "\u00ad\u061c\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff"
# C0/C1 controls and lone surrogates (a Python str may hold them; UTF-8 cannot).
_DROP = re.compile(f"[\x00-\x1f\x7f-\x9f\ud800-\udfff{_INVISIBLE}]")
_SPACE_CONTROLS = {ord(c): " " for c in "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x85"}

_CJK_KEEP = re.compile("([\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff60\uffe0-\uffe6\u2025\u2026]+)")

_ARABIC = "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufefe"
_ZWNJ_RUN = re.compile("\u200c{2,}")
_ZWNJ_STRAY = re.compile(f"(?<![{_ARABIC}])\u200c|\u200c(?![{_ARABIC}])")
_TATWEEL = "\u0640"
_LIGATURES = re.compile("[\ufdf0-\ufdfd\ufef5-\ufefc]")
_TO_LATIN = str.maketrans("۰۱۲۳۴۵۶۷۸۹٠١٢٣٤٥٦٧٨٩", "01234567890123456789")
_ARABIC_INDIC_TO_PERSIAN = str.maketrans("٠١٢٣٤٥٦٧٨٩%", "۰۱۲۳۴۵۶۷۸۹٪")
_LATIN_TO_PERSIAN = str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹")
_LATIN_DIGIT_RUN = re.compile("(?<![A-Za-z0-9])[0-9]+(?![A-Za-z0-9])")  # not part of a Latin word like B2
_ARABIC_LETTERS = frozenset("آابپتثجچحخدذرزژسشصضطظعغفقکگلمنوهیئءؤأإة")
_PLURAL = frozenset(("ها", "های", "هایی"))
_CLITICS = frozenset(("ام", "ات", "اش", "ایم", "اید", "اند"))
_TRAILING_PUNCT = re.compile(r"[^\w\u200c]+$")
_HEH_HA = re.compile("(?<=ه)(?=ها)")  # شاخههای -> شاخه‌های (hazm's own affix rule)


def _clean(text: str) -> str:
    """Controls and invisibles out; whitespace controls become spaces (collapsed later)."""
    return _DROP.sub("", text.translate(_SPACE_CONTROLS))


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _fold_cjk(text: str) -> str:
    """NFKC on everything but the full-width punctuation Chinese keeps (the odd pieces of the split)."""
    parts = _CJK_KEEP.split(text)
    parts[::2] = [unicodedata.normalize("NFKC", p) for p in parts[::2]]
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def _hazm():
    """hazm's Normalizer and its letter table, built once per process (~1.5 s of dictionaries).

    Every option is on so that every step's data exists; ``_persian`` runs the steps it wants itself.
    """
    import hazm
    from hazm.utils import maketrans

    n = hazm.Normalizer(correct_spacing=True, remove_diacritics=True, persian_numbers=True)
    return n, maketrans(n.translation_src, n.translation_dst)


def _persian_digits(text: str) -> str:
    text = text.translate(_ARABIC_INDIC_TO_PERSIAN)
    return _LATIN_DIGIT_RUN.sub(lambda m: m.group().translate(_LATIN_TO_PERSIAN), text)


def _join_affixes(words: list[str], verbs) -> list[str]:
    """Space-separated words with detached prefixes and suffixes joined by ZWNJ (see the module docstring)."""
    out: list[str] = []
    for w in words:
        prev = out[-1] if out else ""
        core = _TRAILING_PUNCT.sub("", w)  # "اند." is the clitic اند before a full stop
        if prev and (
            (core in _PLURAL and prev[-1] in _ARABIC_LETTERS)
            or (core in _CLITICS and len(prev) > 1 and prev[-1] == "ه")
            or (prev in ("می", "نمی") and f"{prev}\u200c{core}" in verbs)
        ):
            out[-1] = f"{prev}\u200c{w}"
        else:
            out.append(w)
    return out


def _persian(text: str, digits: Digits, remove_diacritics: bool) -> str:
    # hazm 0.10's Normalizer.normalize step by step, without correct_spacing and persian_numbers (see the module
    # docstring), with its letter table built once: normalize() rebuilds it on every call, half its time.
    # Its unicodes_replacement step (11 regexes) runs only when one of its ligatures is there.
    hz, letters = _hazm()
    text = unicodedata.normalize("NFKC", text).translate(letters)
    text = hz.persian_style(text)
    if digits == "persian":
        text = _persian_digits(text)
    elif digits == "latin":
        text = text.translate(_TO_LATIN)
    if remove_diacritics:
        text = hz.remove_diacritics(text)
    if _LIGATURES.search(text):
        text = hz.unicodes_replacement(text)
    text = hz.remove_specials_chars(text)
    text = hz.decrease_repeated_chars(text)
    text = hz.seperate_mi(text)
    text = text.replace(_TATWEEL, "")
    text = _ZWNJ_STRAY.sub("", _ZWNJ_RUN.sub("\u200c", _HEH_HA.sub("\u200c", text)))
    return " ".join(_join_affixes(_collapse(text).split(" "), hz.verbs))


def normalize(text: str, lang: str, digits: Digits = "persian", remove_diacritics: bool = True) -> str:
    """``text`` normalized for language ``lang`` (``fa``, ``zh``, ``en``; anything else is treated as ``en``).

    ``digits`` and ``remove_diacritics`` apply to Persian only. Returns one line without leading or trailing spaces
    ("" when nothing is left).
    """
    text = _clean(text)
    if lang == "fa":
        text = _persian(_collapse(text), digits, remove_diacritics)
    elif lang == "zh":
        text = _fold_cjk(text)
    else:
        text = unicodedata.normalize("NFKC", text)
    # NFKC and hazm can produce new whitespace (U+3000 -> space, ligature expansion) or controls never; collapse last.
    return _collapse(text)
