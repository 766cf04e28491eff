"""The bundled sample corpus (``data/sample``): present, valid UTF-8, big enough, and as its data card says.

The hard cases the normalizer and the language detector must handle are counted here from the files themselves,
and ``data/README.md`` must quote exactly these counts (``python tests/test_sample_data.py`` prints them as the
card's table), so neither the data nor the card can drift without this test failing.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"  # as conftest's sample_dir, for __main__

# Non-empty lines each file must keep; the pipeline's smoke runs and the README's command are sized for these.
FLOORS = {"fa.txt": 340, "zh.txt": 290, "en.txt": 240, "mixed.txt": 55}

ARABIC_INDIC_DIGITS = re.compile("[\u0660-\u0669]")
PERSIAN_DIGITS = re.compile("[\u06f0-\u06f9]")
LATIN_DIGITS = re.compile("[0-9]")
HARAKAT = re.compile("[\u064e-\u0652]")  # fatha, damma, kasra, shadda, sukun
TANWIN = re.compile("[\u064b-\u064d]")
# A space where ZWNJ belongs: the verb prefix (n)mi or a plural/ezafe suffix written as a separate word.
SPACED_AFFIX = re.compile(r"(?:^|\s)ن?(?:می|مي) (?=[^\s\u200c])|[^\s\u200c] (?:ها|هاي|های|هایی|ی|ي)(?=[\s.،؟!]|$)")
ZWNJ_BESIDE_SPACE = re.compile("\u200c | \u200c")
SHIR = re.compile(r"(?:^|\s)(?:شیر|شير)(?=[\s.،؟!]|$)")
FULLWIDTH_ALNUM = re.compile("[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a]")
FULLWIDTH_ANY = re.compile("[\uff01-\uff5e\u3000]")
HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff]")
ASCII_PUNCT_BY_HAN = re.compile(r"[\u4e00-\u9fff][,.!?:;\"()]|[,.!?:;\"()][\u4e00-\u9fff]")
LATIN_WORD = re.compile("[A-Za-z]{2,}")
CURLY_QUOTES = re.compile("[\u2018\u2019\u201c\u201d]")
LIGATURES = re.compile("[\ufb00-\ufb06]")


def script_of(ch: str) -> str | None:
    """The script a letter counts for in per-line language detection: Arabic, Han or Latin (None for the rest)."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    if name.startswith("ARABIC"):
        return "Arabic"
    if name.startswith("CJK"):
        return "Han"
    if "LATIN" in name:
        return "Latin"
    return None


def read_lines(sample: Path, name: str) -> list[str]:
    return (sample / name).read_bytes().decode("utf-8").split("\n")[:-1]


def general_counts(sample: Path, name: str) -> dict[str, int]:
    text = (sample / name).read_bytes().decode("utf-8")
    lines = text.split("\n")[:-1]
    content = [l for l in lines if l.strip()]
    return {
        "lines (non-empty)": len(content),
        "characters": len(text),
        "empty or whitespace-only lines": len(lines) - len(content),
        "lines with leading or trailing whitespace": sum(l != l.strip() for l in content),
        "lines with a doubled space": sum("  " in l.strip() for l in content),
    }


def hard_case_counts(sample: Path) -> dict[str, dict[str, int]]:
    """Per file, the number of lines showing each hard case (the card's table)."""
    counts = {name: general_counts(sample, name) for name in FLOORS}

    fa = [l for l in read_lines(sample, "fa.txt") if l.strip()]
    counts["fa.txt"].update({
        "Arabic yeh ي (U+064A)": sum("\u064a" in l for l in fa),
        "Arabic kaf ك (U+0643)": sum("\u0643" in l for l in fa),
        "ZWNJ (U+200C)": sum("\u200c" in l for l in fa),
        "space where ZWNJ belongs (می خواهم, کتاب ها)": sum(bool(SPACED_AFFIX.search(l)) for l in fa),
        "ZWNJ with a space beside it": sum(bool(ZWNJ_BESIDE_SPACE.search(l)) for l in fa),
        "Arabic-Indic digits ٠-٩": sum(bool(ARABIC_INDIC_DIGITS.search(l)) for l in fa),
        "Persian digits ۰-۹": sum(bool(PERSIAN_DIGITS.search(l)) for l in fa),
        "Latin digits 0-9": sum(bool(LATIN_DIGITS.search(l)) for l in fa),
        "harakat (fatha, kasra, damma, sukun)": sum(bool(HARAKAT.search(l)) for l in fa),
        "tanwin (as in لطفاً)": sum(bool(TANWIN.search(l)) for l in fa),
        "tatweel ـ (U+0640)": sum("\u0640" in l for l in fa),
        "the word شیر (lion, milk, tap)": sum(bool(SHIR.search(l)) for l in fa),
    })

    zh = [l for l in read_lines(sample, "zh.txt") if l.strip()]
    dupes = Counter(l.strip() for l in zh)
    counts["zh.txt"].update({
        "full-width Latin letters or digits (ＡＢＣ１２３)": sum(bool(FULLWIDTH_ALNUM.search(l)) for l in zh),
        "half-width punctuation beside Han": sum(bool(ASCII_PUNCT_BY_HAN.search(l)) for l in zh),
        "Latin words": sum(bool(LATIN_WORD.search(l)) for l in zh),
        "Latin digits 0-9": sum(bool(LATIN_DIGITS.search(l)) for l in zh),
        "exact duplicate lines (extra copies)": sum(n - 1 for n in dupes.values()),
    })

    en = [l for l in read_lines(sample, "en.txt") if l.strip()]
    counts["en.txt"].update({
        "curly quotes or apostrophes": sum(bool(CURLY_QUOTES.search(l)) for l in en),
        "ligatures (ﬁ, ﬂ, ﬃ)": sum(bool(LIGATURES.search(l)) for l in en),
        "full-width forms": sum(bool(FULLWIDTH_ANY.search(l)) for l in en),
        "non-breaking spaces (U+00A0)": sum("\u00a0" in l for l in en),
        "changed by NFKC": sum(unicodedata.normalize("NFKC", l) != l for l in en),
    })

    mixed = [l for l in read_lines(sample, "mixed.txt") if l.strip()]
    scripts = [Counter(s for s in map(script_of, l) if s) for l in mixed]
    majority = Counter(c.most_common(1)[0][0] for c in scripts if c)
    counts["mixed.txt"].update({
        "lines with two or more scripts": sum(len(c) >= 2 for c in scripts),
        "lines with all three scripts": sum(len(c) == 3 for c in scripts),
        "majority script Arabic": majority["Arabic"],
        "majority script Han": majority["Han"],
        "majority script Latin": majority["Latin"],
    })
    return counts


def card_counts(card: Path) -> dict[str, dict[str, int]]:
    """The counts table of the data card: rows ``| `file` | what | count |``."""
    rows: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"^\| `(\w+\.txt)` \| (.+?) \| ([\d,]+) \|$", card.read_text(encoding="utf-8"), re.M):
        rows.setdefault(m.group(1), {})[m.group(2)] = int(m.group(3).replace(",", ""))
    return rows


@pytest.fixture
def counts(sample_dir) -> dict[str, dict[str, int]]:
    return hard_case_counts(sample_dir)


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_file_is_utf8_with_enough_lines(sample_dir, name):
    raw = (sample_dir / name).read_bytes()
    text = raw.decode("utf-8")  # raises on invalid UTF-8
    assert not raw.startswith(b"\xef\xbb\xbf"), f"{name}: starts with a byte-order mark"
    assert text.endswith("\n") and "\r" not in text, f"{name}: lines must end in a single \\n"
    assert sum(bool(l.strip()) for l in text.splitlines()) >= FLOORS[name]


def test_card_quotes_the_counts_of_the_files(sample_dir, counts):
    assert card_counts(sample_dir.parent / "README.md") == counts, "data/README.md is stale: rerun `python tests/test_sample_data.py` for its table"


def test_persian_has_the_normalizer_hard_cases(sample_dir, counts):
    fa = counts["fa.txt"]
    for case in ("Arabic yeh ي (U+064A)", "Arabic kaf ك (U+0643)", "space where ZWNJ belongs (می خواهم, کتاب ها)",
                 "ZWNJ with a space beside it", "Arabic-Indic digits ٠-٩", "Persian digits ۰-۹", "Latin digits 0-9"):
        assert fa[case] >= 5, case
    assert fa["ZWNJ (U+200C)"] >= 150
    assert fa["harakat (fatha, kasra, damma, sukun)"] >= 3 and fa["tatweel ـ (U+0640)"] >= 2
    assert fa["the word شیر (lion, milk, tap)"] >= 5
    lines = read_lines(sample_dir, "fa.txt")
    assert "در جنگل یک شیر درنده را دیدم" in lines
    assert any("می خواهم" in l for l in lines) and any("کتاب ها" in l for l in lines)
    assert any("می\u200cخواهم" in l for l in lines) and any("کتاب\u200cها" in l for l in lines)


def test_chinese_has_fullwidth_latin_and_mixed_punctuation(sample_dir, counts):
    zh = counts["zh.txt"]
    assert zh["full-width Latin letters or digits (ＡＢＣ１２３)"] >= 10
    assert zh["half-width punctuation beside Han"] >= 10
    assert zh["Latin words"] >= 15 and zh["Latin digits 0-9"] >= 15
    assert 2 <= zh["exact duplicate lines (extra copies)"] <= 5
    han_lines = [l for l in read_lines(sample_dir, "zh.txt") if l.strip()]
    assert sum(bool(HAN.search(l)) for l in han_lines) == len(han_lines)
    # Simplified, not Traditional: none of the common traditional-only forms.
    assert not re.search("[們這個來說時們為會國學過還開關見買車長書]", "".join(han_lines))


def test_english_has_what_nfkc_and_the_normalizer_fix(counts):
    en = counts["en.txt"]
    assert en["curly quotes or apostrophes"] >= 5
    assert en["ligatures (ﬁ, ﬂ, ﬃ)"] >= 3 and en["full-width forms"] >= 3 and en["non-breaking spaces (U+00A0)"] >= 3
    assert en["changed by NFKC"] >= 15


def test_mixed_lines_mix_scripts_and_every_script_leads_some(counts):
    mixed = counts["mixed.txt"]
    assert mixed["lines with two or more scripts"] >= 20
    assert mixed["lines with all three scripts"] >= 1
    assert min(mixed["majority script Arabic"], mixed["majority script Han"], mixed["majority script Latin"]) >= 10


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_each_file_has_whitespace_for_the_normalizer_to_drop(counts, name):
    assert counts[name]["empty or whitespace-only lines"] >= 1
    assert counts[name]["lines with leading or trailing whitespace"] >= 2


if __name__ == "__main__":
    # Prints the counts table for data/README.md.
    print("| file | what | count |\n|---|---|---:|")
    for name, rows in hard_case_counts(SAMPLE).items():
        for what, n in rows.items():
            print(f"| `{name}` | {what} | {n:,} |")
