"""Language of a line by script: Arabic script -> ``fa``, Han -> ``zh``, Latin -> ``en``.

A line is counted in *words* of each script, so that scripts that write a word in one character and scripts that
spell it in letters weigh the same: a run of Arabic-script letters is one vote for ``fa``, a run of Latin letters one
vote for ``en``, and every Han character one vote for ``zh`` (Chinese words are one or two characters and unsplit).
The majority wins ("我喜欢Python编程" is Chinese, "I love 北京 very much" English). Ties go to the rarer script,
``fa`` before ``zh`` before ``en``, since Latin words inside Persian or Chinese text are more common than the reverse.
A line with none of the three scripts (digits, symbols, Cyrillic, …) has no language: ``None``.
"""

from __future__ import annotations

import re

LANGUAGES = ("fa", "zh", "en")
SCRIPT_NAMES = {"fa": "Arabic (Persian)", "zh": "Han (Chinese)", "en": "Latin"}  # for messages

ARABIC_RUN = re.compile("[\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufefe]+")
HAN_CHAR = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
LATIN_RUN = re.compile("[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\uff21-\uff3a\uff41-\uff5a]+")


def script_votes(text: str) -> dict[str, int]:
    """Votes per language: Arabic-script runs (fa), Han characters (zh), Latin-letter runs (en)."""
    return {
        "fa": len(ARABIC_RUN.findall(text)),
        "zh": len(HAN_CHAR.findall(text)),
        "en": len(LATIN_RUN.findall(text)),
    }


def detect_language(text: str) -> str | None:
    """``fa``, ``zh`` or ``en`` by majority script (ties: fa, zh, en), or None when the text has none of them."""
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
