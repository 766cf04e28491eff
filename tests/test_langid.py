"""Language by script: majority of words, ties to the rarer script, None without any of the three."""

import pytest

from sokhan.tokenization import detect_language
from sokhan.tokenization.langid import script_votes


@pytest.mark.parametrize(
    "text, lang",
    [
        pytest.param("کتاب‌ها را خواندم", "fa", id="persian"),
        pytest.param("كتاب ي", "fa", id="arabic-letters"),
        pytest.param("我喜欢自然语言处理。", "zh", id="chinese"),
        pytest.param("The quick brown fox.", "en", id="english"),
        pytest.param("我喜欢Python编程", "zh", id="han-majority-over-one-latin-word"),
        pytest.param("I visited 北京 last year with friends", "en", id="latin-majority"),
        pytest.param("من Python و JavaScript را دوست دارم", "fa", id="persian-majority"),
        pytest.param("سلام hello", "fa", id="tie-goes-to-fa"),
        pytest.param("中文 word", "zh", id="tie-goes-to-zh"),
        pytest.param("ＡＢＣ ｄｅｆ", "en", id="fullwidth-latin"),
        pytest.param("Ça va très bien", "en", id="latin-accents"),
        pytest.param("12345 !!! ...", None, id="no-script"),
        pytest.param("Привет мир", None, id="cyrillic"),
        pytest.param("", None, id="empty"),
    ],
)
def test_detect_language(text, lang):
    assert detect_language(text) == lang


def test_votes_count_words_for_alphabets_and_characters_for_han():
    assert script_votes("one two 三四五 شش") == {"fa": 1, "zh": 3, "en": 2}


def test_other_majority_names_a_language_that_outvotes_the_tag():
    from sokhan.tokenization.langid import other_majority

    assert other_majority({"zh": 6}, "fa") == ("zh", 6)
    assert other_majority({"fa": 4, "en": 2}, "fa") is None  # the tag's own language leads
    assert other_majority({"en": 3, "fa": 3}, "fa") is None  # half is not more than half
    assert other_majority({"en": 2, None: 3}, "fa") is None  # lines without letters count in the total
    assert other_majority({}, "fa") is None and other_majority({None: 5}, "zh") is None
