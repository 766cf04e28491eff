"""One line of raw text -> its normalized form, per language.

Every language: control characters are dropped (the whitespace ones become spaces), invisible formatting
characters that carry no meaning here (BOM, zero-width space, soft hyphen, bidi marks and embeddings) are dropped,
whitespace runs become one space and the ends are trimmed. A multi-line text comes out as one line. Kept on
purpose: ZWNJ (U+200C, part of Persian spelling) and ZWJ (U+200D, emoji sequences).

Persian (``fa``): NFKC, then hazm 0.10's ``Normalizer`` steps, except two that mangle text:

- ``correct_spacing`` re-tokenizes the line and rewrites punctuation spacing: decimals (``3.14`` -> ``۳ ٫ ۱۴``),
  dates (``۱۳۹۹/۰۱/۰۱`` -> ``۱۳۹۹ / ۰۱ / ۰۱``), URLs and e-mail addresses come out broken. Its dictionary-driven
  ``token_spacing`` also glues whole phrases (``ازدواج کرده`` -> ``ازدواج‌کرده``; run on space-separated words it
  gives ``تعطیل شده اند.`` -> ``تعطیل‌شده اند.``, blind to the clitic before the full stop) and, in poetry, the
  standalone words ``ای`` ("O") and ``گر`` ("if") onto the word before them (``است ای`` -> ``است‌ای``; 765 suffix joins in
  Hafez, many of them wrong).
- ``persian_numbers`` also rewrites digits inside Latin words (``B2`` -> ``B۲``).

and one rule of a third: ``persian_style`` turns every dot between two digits into the Persian decimal separator ٫,
in URLs, e-mail addresses, versions and IP addresses too (``v2.0`` -> ``v2٫0``), and between Latin digits that stay
Latin (``3.14`` -> ``3٫14`` with ``digits = latin``).

Kept from hazm: Arabic -> Persian letters (ي -> ی, ك -> ک, presentation forms -> letters), Persian quotes and
ellipsis (``persian_style``), diacritics removal (configurable), removal of Quranic marks, ligature expansion
(﷽, ﷲ), squeezing of letters repeated three or more times, and the dictionary-checked ``می``/``نمی`` prefix join
(``میخواهم`` -> ``می‌خواهم``, ``میز`` stays). ZWNJ fixes (ours, conservative): tatweel (ـ) removed; ZWNJ runs
squeezed to one; a ZWNJ typed with a space beside it between two Arabic-script words kept and the space dropped
(``می ‌شود``, ``ظرف‌ های`` -> ``می‌شود``, ``ظرف‌های``: the writer meant one word, whether or not hazm knows it);
any other ZWNJ kept only between two Arabic-script characters; a detached ``می``/``نمی`` joined to the next word when hazm's
conjugation list knows the result, alone or with an object clitic ``م ت ش مان تان شان`` (``می روم`` -> ``می‌روم``,
``می فرستمت`` -> ``می‌فرستمت``). Not joined: ``می`` before anything else, since in poetry it is often "wine"
(``ساقی بیار می``, ``می ده``, ``می ناب``), nor before an archaic negated or ``ب``- verb (``می نرود`` in Saadi, but
``هنوز می نچشید``, ``به می بفروشیم`` in Hafez are "wine": 3 of the 5 such cases in Hafez). The
plural suffix ``ها``/``های``/``هایی`` joined to the word before it (``کتاب ها`` -> ``کتاب‌ها``, ``شاخههای`` ->
``شاخه‌های``); the clitics ``ام ات اش ایم اید اند`` joined after a word ending in ``ه`` (``شده اند`` -> ``شده‌اند``).
Digits (``digits``): ``persian`` turns Arabic-Indic ٠-٩ into ۰-۹ and Latin 0-9 into ۰-۹ except in a run of
non-space characters holding a Latin letter (``B2``, ``mp3``, ``COVID-19``, URLs, e-mail addresses stay), % into ٪;
``latin`` turns Persian and Arabic-Indic digits into 0-9 (and ٫ between them into .); ``keep`` leaves them. A
number with one dot in Persian or Arabic-Indic digits gets the Persian decimal separator (``۳.۱۴`` -> ``۳٫۱۴``,
so ``3.14`` -> ``۳٫۱۴`` with ``persian``); a run of several dots (``۱۹۲.۱۶۸.۱.۱``) is no decimal and keeps them.

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
# Arabic-script letters and harakat: not its punctuation or digits, which a ZWNJ never joins.
_ARABIC_LETTER = "\u0620-\u065f\u066e-\u06d3\u06d5\u06fa-\u06ff\u0750-\u077f\u08a0-\u08ff"
_ZWNJ_SPACED = re.compile(f"(?<=[{_ARABIC_LETTER}]) *\u200c *(?=[{_ARABIC_LETTER}])")
_ZWNJ_STRAY = re.compile(f"(?<![{_ARABIC}])\u200c|\u200c(?![{_ARABIC}])")
_TATWEEL = "\u0640"
_LIGATURES = re.compile("[\ufdf0-\ufdfd\ufef5-\ufefc]")
_TO_LATIN = str.maketrans("۰۱۲۳۴۵۶۷۸۹٠١٢٣٤٥٦٧٨٩", "01234567890123456789")
_ARABIC_INDIC_TO_PERSIAN = str.maketrans("٠١٢٣٤٥٦٧٨٩%", "۰۱۲۳۴۵۶۷۸۹٪")
_LATIN_TO_PERSIAN = str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹")
_NONSPACE = re.compile(r"\S+")
_ASCII_LETTER = re.compile("[A-Za-z]")
# A decimal: one separator between digits, the number not part of a longer dotted run (192.168.1.1, 1.2.3).
_DECIMAL = re.compile("(?<![0-9۰-۹٠-٩.٫])([۰-۹٠-٩]+)\\.([۰-۹٠-٩]+)(?![0-9۰-۹٠-٩.٫])")
_PERSIAN_DECIMAL = re.compile("(?<=[0-9])٫(?=[0-9])")
_ARABIC_LETTERS = frozenset("آابپتثجچحخدذرزژسشصضطظعغفقکگلمنوهیئءؤأإة")
_PLURAL = frozenset(("ها", "های", "هایی"))
_CLITICS = frozenset(("ام", "ات", "اش", "ایم", "اید", "اند"))
_OBJECT_CLITICS = ("مان", "تان", "شان", "م", "ت", "ش")  # می فرستمت "I send you": hazm lists the verb without them
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


def _outside_latin(step, text: str) -> str:
    """``step`` applied to each run of non-space characters that holds no Latin letter: a Latin word, URL, e-mail
    address or version (``B2``, ``COVID-19``, ``https://x.org/2024/post_5``, ``a.b1990@x.com``, ``v2.0``) is left
    as it is."""
    return _NONSPACE.sub(lambda m: m.group() if _ASCII_LETTER.search(m.group()) else step(m.group()), text)


def _persian_digits(text: str) -> str:
    text = text.translate(_ARABIC_INDIC_TO_PERSIAN)
    return _outside_latin(lambda w: w.translate(_LATIN_TO_PERSIAN), text)


def _is_verb(word: str, verbs) -> bool:
    """``word`` (``می‌…``) is in hazm's conjugation list, alone or with an object clitic (``می‌فرستمت``).

    hazm's list also holds the bare prefix ``می‌``, so the caller checks that a verb follows (``می ،`` stays).
    """
    return word in verbs or any(
        word.endswith(c) and len(word) - len(c) > 4 and word[: -len(c)] in verbs for c in _OBJECT_CLITICS
    )


def _join_affixes(words: list[str], verbs) -> list[str]:
    """Space-separated words with detached prefixes and suffixes joined by ZWNJ (see the module docstring)."""
    out: list[str] = []
    for w in words:
        prev = out[-1] if out else ""
        core = _TRAILING_PUNCT.sub("", w)  # "اند." is the clitic اند before a full stop
        if prev and (
            (core in _PLURAL and prev[-1] in _ARABIC_LETTERS)
            or (core in _CLITICS and len(prev) > 1 and prev[-1] == "ه")
            or (prev in ("می", "نمی") and core and _is_verb(f"{prev}\u200c{core}", verbs))
        ):
            out[-1] = f"{prev}\u200c{w}"
        else:
            out.append(w)
    return out


def _zwnj(text: str) -> str:
    """ZWNJ runs squeezed, a ZWNJ beside a space repaired, any other ZWNJ kept only between Arabic-script characters."""
    if "\u200c" not in text:
        return text
    text = _ZWNJ_RUN.sub("\u200c", text)
    # A ZWNJ typed beside a space (می ‌شود, ظرف‌ های) says the two words are one: the space goes, not the ZWNJ.
    return _ZWNJ_STRAY.sub("", _ZWNJ_SPACED.sub("\u200c", text))


def _renormalize(text: str, letters: dict) -> str:
    """NFKC and hazm's letter table again, where ``text`` is no longer in NFKC (a quick check otherwise)."""
    if unicodedata.is_normalized("NFKC", text):
        return text
    return unicodedata.normalize("NFKC", text).translate(letters)


def _fixpoint(step, text: str) -> str:
    """``step`` applied until it changes nothing (once when it changes nothing at first, the usual case).

    For hazm steps that a second run changes again: persian_style turns ``""م""`` into ``"«م»"``, and
    decrease_repeated_chars replaces a repeat's text everywhere, leaving ``مممم`` as ``ممم`` when ``ممم`` comes first.
    """
    while (again := step(text)) != text:
        text = again
    return text


def _persian_style(hz, text: str) -> str:
    """hazm's ``persian_style`` (quotes -> «», ``...`` -> ``…``) without its decimal rule, which also rewrote the
    dots of URLs, e-mail addresses, versions and IP addresses (``v2.0`` -> ``v2٫0``); ``_DECIMAL`` replaces it."""
    for pattern, repl in _persian_style_patterns(hz):
        text = pattern.sub(repl, text)
    return text


@functools.lru_cache(maxsize=1)
def _persian_style_patterns(hz) -> list:
    return [(re.compile(p), r) for p, r in hz.persian_style_patterns if "٫" not in r]


def _persian(text: str, digits: Digits, remove_diacritics: bool) -> str:
    # hazm 0.10's Normalizer.normalize step by step, without correct_spacing and persian_numbers (see the module
    # docstring), with its letter table built once: normalize() rebuilds it on every call, half its time.
    # Its unicodes_replacement step (11 regexes) runs only when one of its ligatures is there.
    hz, letters = _hazm()
    # hazm's removals (tatweel, diacritics, specials) and our ZWNJ cleanup come before its rewrites, so that a second
    # pass finds nothing new: "ممـم" must reach the repeated-letter squeeze as "ممم" does, and ".‌.." or ".َ.."
    # reach persian_style's ellipsis rule as "..." does. The ZWNJ cleanup runs again at the end for seperate_mi.
    folded = unicodedata.normalize("NFKC", text).translate(letters)
    text = folded.replace(_TATWEEL, "")
    if remove_diacritics:
        text = hz.remove_diacritics(text)
    if _LIGATURES.search(text):
        text = hz.unicodes_replacement(text)
    text = hz.remove_specials_chars(text)
    if text != folded:  # NFKC again: a removal can leave marks out of canonical order or composable (ا + ٓ -> آ)
        text = unicodedata.normalize("NFKC", text).translate(letters)
    if (unzwnj := _zwnj(text)) != text:
        # A stray ZWNJ was a barrier between combining marks: gone, they may need reordering or composing (e U+0301
        # ZWNJ U+0327 -> é U+0327, whose NFKC is ȩ U+0301), and the steps below must see what a second pass sees.
        text = _renormalize(unzwnj, letters)
    text = _fixpoint(functools.partial(_persian_style, hz), text)
    if digits == "persian":
        text = _persian_digits(text)
    elif digits == "latin":
        # A ZWNJ kept between a Persian digit and ٫ (two Arabic-script characters) is stray beside a Latin digit:
        # gone before the decimal rule, or the last cleanup removed it after and a second pass made ٫ a ".".
        text = _PERSIAN_DECIMAL.sub(".", _zwnj(text.translate(_TO_LATIN)))
    # The Persian decimal separator, between Persian digits only: 3.14 stays as it is where digits stay Latin.
    text = _outside_latin(lambda w: _DECIMAL.sub("\\1٫\\2", w), text)
    text = _fixpoint(hz.decrease_repeated_chars, text)
    # After _HEH_HA: seperate_mi reads its ZWNJ. A ZWNJ removed here or in the digits step can again leave combining
    # marks out of canonical order (U+0301 ZWNJ U+064E, the ZWNJ kept above between two Arabic-script marks): NFC
    # puts them in order. Not NFKC, which would undo persian_style (… -> ...).
    text = _zwnj(hz.seperate_mi(_HEH_HA.sub("\u200c", text)))
    if not unicodedata.is_normalized("NFC", text):  # a quick check; rare: only after a removed stray ZWNJ
        text = unicodedata.normalize("NFC", text)
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
