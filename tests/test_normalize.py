"""normalize(): hazm for Persian without its mangling spacing step, CJK-safe width folding, NFKC, cleaning."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sokhan.tokenization import normalize

ZWNJ = "\u200c"


@pytest.mark.parametrize(
    "raw, expected",
    [
        pytest.param("علي كتاب", "علی کتاب", id="arabic-yeh-kaf"),
        pytest.param("ﻻ ﺳﻼﻡ", "لا سلام", id="presentation-forms"),
        pytest.param("کتاب ها", f"کتاب{ZWNJ}ها", id="suffix-ha-joined"),
        pytest.param("می روم", f"می{ZWNJ}روم", id="mi-prefix-joined"),
        pytest.param("میخواهم", f"می{ZWNJ}خواهم", id="mi-prefix-separated"),
        pytest.param(f"{ZWNJ}سلام{ZWNJ}{ZWNJ}{ZWNJ}ها{ZWNJ} x", f"سلام{ZWNJ}ها x", id="zwnj-runs-and-strays"),
        pytest.param(f"کتاب{ZWNJ} ها", f"کتاب{ZWNJ}ها", id="zwnj-before-space-then-suffix"),
        pytest.param("ســـلام", "سلام", id="tatweel"),
        pytest.param("اَلسَّلامُ عَلَیکُم", "السلام علیکم", id="diacritics"),
        pytest.param("سلاااااام", "سلام", id="repeated-letters"),
        # hazm's correct_spacing would give "۳ ٫ ۱۴", "۱۳۹۹ / ۰۱ / ۰۱" and "me@x. com": we keep these intact.
        pytest.param("قیمت 3.14 دلار", "قیمت ۳٫۱۴ دلار", id="decimal-intact"),
        pytest.param("سال ۱۳۹۹/۰۱/۰۱", "سال ۱۳۹۹/۰۱/۰۱", id="date-intact"),
        pytest.param("ایمیل me@x.com و http://a.b/c", "ایمیل me@x.com و http://a.b/c", id="email-url-intact"),
        pytest.param("ساقی بیار می", "ساقی بیار می", id="mi-the-word-stays"),
        pytest.param("١٢٣ و 456", "۱۲۳ و ۴۵۶", id="digits-persian"),
        pytest.param("اتاق B2 و فایل mp3 و COVID-19", "اتاق B2 و فایل mp3 و COVID-۱۹", id="digits-in-latin-words-stay"),
        pytest.param("شاخههای درخت", f"شاخه{ZWNJ}های درخت", id="heh-ha-split"),
        pytest.param("مدرسه ها تعطیل شده اند.", f"مدرسه{ZWNJ}ها تعطیل شده{ZWNJ}اند.", id="plural-and-clitic-before-punctuation"),
        # hazm's token_spacing would glue these: a verb phrase, and the poetic "O" and "if".
        pytest.param("تازه ازدواج کرده است", "تازه ازدواج کرده است", id="verb-phrase-stays"),
        pytest.param("بیا ای دوست که گر تو نباشی", "بیا ای دوست که گر تو نباشی", id="poetry-ai-gar-stay"),
    ],
)
def test_persian(raw, expected):
    assert normalize(raw, "fa") == expected


def test_persian_digit_policies():
    raw = "١٢٣ ۴۵۶ 789"
    assert normalize(raw, "fa", digits="persian") == "۱۲۳ ۴۵۶ ۷۸۹"
    assert normalize(raw, "fa", digits="latin") == "123 456 789"
    assert normalize(raw, "fa", digits="keep") == raw


def test_persian_diacritics_kept_when_asked():
    assert normalize("عَلَی", "fa", remove_diacritics=False) == "عَلَی"
    assert normalize("عَلَی", "fa", remove_diacritics=True) == "علی"


@pytest.mark.parametrize(
    "raw, expected",
    [
        pytest.param("你好，世界！（测试）：是；吗？", "你好，世界！（测试）：是；吗？", id="fullwidth-punctuation-kept"),
        pytest.param("《书名》「引号」【括号】、～……", "《书名》「引号」【括号】、～……", id="cjk-brackets-ellipsis-kept"),
        pytest.param("ＡＢＣ１２３ｘｙｚ", "ABC123xyz", id="fullwidth-latin-digits-folded"),
        pytest.param("中文\u3000空格", "中文 空格", id="ideographic-space"),
        pytest.param("｢半角｣｡､", "「半角」。、", id="halfwidth-cjk-punctuation"),
        pytest.param("ｶﾀｶﾅ", "カタカナ", id="halfwidth-katakana"),
        pytest.param("\uf900", "\u8c48", id="compatibility-ideograph"),
    ],
)
def test_chinese(raw, expected):
    assert normalize(raw, "zh") == expected


@pytest.mark.parametrize("lang", ["fa", "zh", "en"])
def test_cleaning_every_language(lang):
    raw = "\ufeff  a\tb\x00c\u200bd\u200e  \r\n e \x85 "
    assert normalize(raw, lang) == "a bcd e"


def test_english_nfkc_and_zwnj_zwj_kept():
    assert normalize("ﬁne  ①", "en") == "fine 1"
    assert normalize("👩\u200d💻", "en") == "👩\u200d💻"
    assert normalize(f"نمی{ZWNJ}دانم", "fa") == f"نمی{ZWNJ}دانم"


text_strategy = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)


@settings(max_examples=150, deadline=None)
@given(text=text_strategy, lang=st.sampled_from(["fa", "zh", "en"]))
def test_output_is_clean_and_idempotent(text, lang):
    out = normalize(text, lang)
    assert out == " ".join(out.split())  # one line, single spaces, trimmed
    assert not any(unicodedata.category(c) in ("Cc", "Cs") for c in out)
    out.encode("utf-8")  # no lone surrogates
    assert normalize(out, lang) == out
    # Idempotence on every line of the real corpora is checked with the lossless test in test_tokenizer.py,
    # which normalizes them anyway.
