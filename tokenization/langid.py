"""Language of a line by script: Arabic script -> ``fa``, Han -> ``zh``, Latin -> ``en``.

A line is counted in *words* of each script, so that scripts that write a word in one character and scripts that
spell it in letters weigh the same. What votes:

- ``fa``: each run of Arabic-script letters. Harakat and other combining marks, tatweel, and a ZWNJ between two of
  its letters stay inside the run (``می‌شود``, ``عَلَی``, ``کتاب‌ها`` are one vote each); Arabic-script digits and
  punctuation (``۱۲۳``, ``٤٥٦``, ``،``, ``؟``) end it. A run of only tatweel or marks is no word and does not vote.
- ``en``: each run of Latin letters (ASCII, Latin-1, Latin Extended-A, -B and Additional, IPA, full-width), combining
  marks (U+0300-036F and the other combining blocks) inside it: ``naïve`` is one vote whether its ``ï`` is one
  character (NFC) or ``i`` + U+0308 (NFD).
- ``zh``: every Han character (Chinese words are one or two characters and unsplit).
- Nothing else: URLs (``https://…``, ``www.…``) and e-mail addresses (their Latin letters say nothing about the
  line around them), digits, punctuation, symbols, other scripts (Cyrillic, Hangul, kana, Hebrew, …).

The majority wins ("我喜欢Python编程" is Chinese, "I love 北京 very much" English). Ties go to the rarer script,
``fa`` before ``zh`` before ``en``, since Latin words inside Persian or Chinese text are more common than the reverse.
A line where nothing votes (``۱۲۳``, ``؟!``, ``https://example.com``, ``Привет``) has no language: ``None``.
The votes are the same for a line in NFC and in NFD.
"""

from __future__ import annotations

import re
import unicodedata

LANGUAGES = ("fa", "zh", "en")
SCRIPT_NAMES = {"fa": "Arabic (Persian)", "zh": "Han (Chinese)", "en": "Latin"}  # for messages

_ARABIC_BLOCKS = ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFE))
# Script-neutral combining marks (U+0300-036F and the rest): they continue the word they follow, so an NFD line
# (كتاب + "nai\u0308ve") counts as its NFC form does.
_MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
_TATWEEL = "\u0640"


def _arabic_classes() -> tuple[str, str]:
    """(letters, the rest of a word) of the Arabic blocks, by Unicode category: letters are L* but tatweel (Lm, a
    stretch of the joining line) and the isolated harakat forms FE70-FE7F (Lo, NFKC: a space and a haraka); the
    rest is the marks (Mn), tatweel and those forms. Digits (Nd), punctuation and symbols are neither."""
    letters, rest = [], [_MARKS, _TATWEEL, "\ufe70-\ufe7f"]
    for lo, hi in _ARABIC_BLOCKS:
        for cp in range(lo, hi + 1):
            c = chr(cp)
            category = unicodedata.category(c)
            if category[0] == "L" and c != _TATWEEL and not 0xFE70 <= cp <= 0xFE7F:
                letters.append(c)
            elif category[0] == "M":
                rest.append(c)
    return "".join(letters), "".join(rest)


_AL, _AW = _arabic_classes()
# A run of Arabic-script letters and marks, ZWNJ-joined runs included; it is a word if it holds a letter.
ARABIC_RUN = re.compile(f"[{_AL}{_AW}]+(?:\u200c+[{_AL}{_AW}]+)*")
ARABIC_LETTER = re.compile(f"[{_AL}]")
HAN_CHAR = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u02af\u1e00-\u1eff\uff21-\uff3a\uff41-\uff5a"
LATIN_WORD = re.compile(f"[{_LATIN}][{_LATIN}{_MARKS}]*")
# A URL with a scheme or www., or an e-mail address: ASCII and Latin letters with their marks (…/wiki/Müller in NFC
# or NFD), so that Persian or Chinese written against it without a space ("访问https://x.org获取", "邮箱ali@x.com")
# is not swallowed with it.
_URL_CHAR = f"!-~{_LATIN}{_MARKS}"
_EMAIL_CHAR = f"-A-Za-z0-9{_LATIN}{_MARKS}"  # "-" first: a literal
# Each branch starts only where its run of characters starts (the lookbehinds): tried from every position inside
# a long run, the search backtracked over the rest of it each time, quadratic (80 s for 100k letters and an "@").
# A scheme's run may start with digits or dots, which it takes along ("سلام.https://…", "3https://…").
_URL_OR_EMAIL = re.compile(
    f"(?:(?<![A-Za-z0-9+.-])[0-9+.-]*[A-Za-z][A-Za-z0-9+.-]*://|(?<![A-Za-z0-9.])www\\.)[{_URL_CHAR}]+"
    f"|(?<![{_EMAIL_CHAR}._%+])[{_EMAIL_CHAR}._%+]+@[{_EMAIL_CHAR}]+(?:\\.[{_EMAIL_CHAR}]+)+",
    re.IGNORECASE,
)


def script_votes(text: str) -> dict[str, int]:
    """Votes per language: Arabic-script words (fa), Han characters (zh), Latin words (en); see the module docstring."""
    if "://" in text or "@" in text or "www." in text or "WWW." in text:  # the regex only on lines that may need it
        text = _URL_OR_EMAIL.sub(" ", text)
    return {
        "fa": sum(map(bool, map(ARABIC_LETTER.search, ARABIC_RUN.findall(text)))),
        "zh": len(HAN_CHAR.findall(text)),
        "en": len(LATIN_WORD.findall(text)),
    }


def detect_language(text: str) -> str | None:
    """``fa``, ``zh`` or ``en`` by majority script (ties: fa, zh, en), or None when nothing in the text votes."""
    votes = script_votes(text)
    best = max(LANGUAGES, key=lambda lang: votes[lang])  # max keeps the first of equals: the tie order
    return best if votes[best] > 0 else None


def other_majority(detected: dict[str | None, int], lang: str) -> tuple[str, int] | None:
    """``(language, lines)`` when more than half of some lines (``detected``: how many ``detect_language`` gave each
    language, None for no letters) read as one language other than ``lang``: a wrong tag or ``--lang``; else None."""
    total = sum(detected.values())
    found = max((d for d in detected if d is not None), key=lambda d: detected[d], default=None)
    if found is None or found == lang or detected[found] * 2 <= total:
        return None
    return found, detected[found]
