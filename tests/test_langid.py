"""Language by script: majority of words, ties to the rarer script, None without any of the three."""

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sokhan.tokenization import detect_language
from sokhan.tokenization.langid import script_votes

ZWNJ = "\u200c"


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
        # A URL or an e-mail address says nothing about the line: it used to outvote a short Persian line.
        pytest.param("ايميل من ali.rezaei@gmail.com است", "fa", id="email-in-persian"),
        pytest.param("سایت https://example.com/2024/post_5 را ببینید", "fa", id="url-in-persian"),
        pytest.param("详见 www.example.com/news/2024", "zh", id="www-url-in-chinese"),
        pytest.param("请访问https://example.org/a/b获取", "zh", id="url-against-han-without-spaces"),
        pytest.param("邮箱ali@example.com", "zh", id="email-against-han-without-spaces"),
        pytest.param("https://example.com/2024/post_5", None, id="url-only"),
        pytest.param("سلام.https://example.com/page/path", "fa", id="url-after-a-full-stop"),
        pytest.param("کتاب 3https://example.com/page/path", "fa", id="url-after-a-digit"),
        pytest.param("ali.rezaei@gmail.com", None, id="email-only"),
        pytest.param("Write to me at ali@example.com please", "en", id="english-around-an-email"),
        # Arabic-script digits, punctuation and tatweel are no letters: like "123", no language.
        pytest.param("۱۲۳", None, id="persian-digits"),
        pytest.param("٤٥٦", None, id="arabic-indic-digits"),
        pytest.param("؟!", None, id="arabic-punctuation"),
        pytest.param("ـــ", None, id="tatweel-only"),
        pytest.param("\u064e\u0651", None, id="harakat-only"),
        pytest.param("iPhone ۱۵", "en", id="latin-word-and-persian-digits"),
        # NFD: the combining diaeresis continues the Latin word, a 1-1 tie as in NFC.
        pytest.param(unicodedata.normalize("NFD", "كتاب naïve"), "fa", id="nfd-latin-word-is-one-vote"),
    ],
)
def test_detect_language(text, lang):
    assert detect_language(text) == lang


def test_votes_count_words_for_alphabets_and_characters_for_han():
    assert script_votes("one two 三四五 شش") == {"fa": 1, "zh": 3, "en": 2}


@pytest.mark.parametrize(
    "text, votes",
    [
        # ZWNJ inside a word, harakat and tatweel: one word; NFD (آ = ا + U+0653) as NFC.
        pytest.param(f"می{ZWNJ}شود کتاب{ZWNJ}ها", 2, id="zwnj-inside-a-word"),
        pytest.param("عَلَیکُم", 1, id="harakat"),
        pytest.param("ســلام", 1, id="tatweel-inside"),
        pytest.param(unicodedata.normalize("NFD", "آمد و رفت"), 3, id="nfd-alef-madda"),
        # Digits and punctuation end a word.
        pytest.param("کتاب۱۲۳دفتر", 2, id="digits-between-words"),
        pytest.param("کتاب،دفتر؟", 2, id="comma-between-words"),
    ],
)
def test_persian_words(text, votes):
    assert script_votes(text)["fa"] == votes


def test_latin_word_with_marks_counts_once_in_nfc_and_nfd():
    for form in ("NFC", "NFD"):
        assert script_votes(unicodedata.normalize(form, "naïve Việt façade"))["en"] == 3, form


# Letters of the three scripts, combining marks (Latin and Arabic), ZWNJ, tatweel, digits, spaces, a URL and an e-mail.
mixed_pieces = st.sampled_from(
    [*"aeinoçéïệAÅبکسلاآأۀی中文 .،۱1", ZWNJ, "\u0640", "\u0301", "\u0308", "\u0323", "\u0327", "\u064e", "\u0651",
     "\u0653", "\u0654", "\u0670", "https://x.org/é", "www.x.org", "a.b@c.com", "@"]
)


@settings(max_examples=300, deadline=None)
@given(text=st.lists(mixed_pieces, max_size=20).map("".join))
def test_votes_do_not_depend_on_the_unicode_form(text):
    nfc = script_votes(unicodedata.normalize("NFC", text))
    assert script_votes(unicodedata.normalize("NFD", text)) == nfc


def test_other_majority_names_a_language_that_outvotes_the_tag():
    from sokhan.tokenization.langid import other_majority

    assert other_majority({"zh": 6}, "fa") == ("zh", 6)
    assert other_majority({"fa": 4, "en": 2}, "fa") is None  # the tag's own language leads
    assert other_majority({"en": 3, "fa": 3}, "fa") is None  # half is not more than half
    assert other_majority({"en": 2, None: 3}, "fa") is None  # lines without letters count in the total
    assert other_majority({}, "fa") is None and other_majority({None: 5}, "zh") is None


@pytest.mark.parametrize("text", ["a" * 200_000 + "@", "a." * 100_000 + "@", "a" * 200_000 + " ://",
                                  "0123456789abcdef" * 12_500 + " mail me@x"], ids=["letters", "dots", "scheme", "hex"])
def test_a_long_run_before_an_at_sign_is_not_quadratic(text):
    """The URL and e-mail pattern was tried from every position inside a long run and backtracked over the rest of
    it each time: 80 s for 100k letters and an "@", minutes at 200k, on every such line of a corpus. Linear now
    (milliseconds); the alarm only stops a regression from hanging the suite."""
    import signal

    def too_slow(*_):
        raise TimeoutError("script_votes took over 20 s: quadratic again")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        votes = script_votes(text)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert votes["fa"] == votes["zh"] == 0
