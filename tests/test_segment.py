"""segment(): language-aware pieces that keep every character, spaces attached to the next word."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sokhan.tokenization import pretokenize, segment
from sokhan.tokenization.corpus import read_lines, source_files
from sokhan.tokenization.segment import SegmenterConfig, may_grow, words

ZWNJ = "\u200c"


def test_persian_words_keep_zwnj_and_spaces_lead():
    text = f"کتاب{ZWNJ}ها را «خواندم»، نمی{ZWNJ}دانم."
    pieces = segment(text, "fa")
    assert "".join(pieces) == text
    assert pieces[0] == f"کتاب{ZWNJ}ها"
    assert f" نمی{ZWNJ}دانم" in pieces
    assert " را" in pieces


def test_persian_text_hazm_rewrites_is_kept_exactly():
    # hazm's tokenizer turns emoji and some symbols into separate or altered tokens; the original survives.
    text = "رفته است 😀 x_y ۳٫۱۴ «نقل» ... ؟!"
    assert "".join(segment(text, "fa")) == text


def test_chinese_words_from_jieba():
    text = "我喜欢自然语言处理，Python 很好。"
    pieces = segment(text, "zh")
    assert "".join(pieces) == text
    assert "喜欢" in pieces and "自然语言" in pieces and "，" in pieces
    assert " 很" in pieces


def test_chinese_hmm_option_changes_unknown_words_only():
    text = "他来到了网易杭研大厦"  # jieba's own example: 杭研 is not in the dictionary
    off = segment(text, "zh", SegmenterConfig(zh_hmm=False))
    on = segment(text, "zh", SegmenterConfig(zh_hmm=True))
    assert "".join(off) == "".join(on) == text
    assert "杭研" in on and "杭研" not in off


def test_chinese_pretokenization_runs_or_jieba():
    text = "我喜欢自然语言处理，Python 很好。"
    assert pretokenize(text, "zh", SegmenterConfig(zh_pretokenize="runs")) == ["我喜欢自然语言处理", "，", "Python", " 很好", "。"]
    assert pretokenize(text, "zh") == segment(text, "zh")
    assert pretokenize(text, "fa") == segment(text, "fa")


def test_english_words_and_punctuation():
    assert segment("Hello,  world's end (x).", "en") == ["Hello", ",", "  world", "'", "s", " end", " (", "x", ")."]


def test_words_counts_alphanumeric_pieces():
    assert words(["Hello", ",", " world", " (", "3", ")"]) == 3


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80), lang=st.sampled_from(["fa", "zh", "en"]))
def test_span_preserving_on_arbitrary_text(text, lang):
    for pieces in (segment(text, lang), pretokenize(text, lang)):
        assert "".join(pieces) == text
        assert all(pieces)
        # Whitespace is a prefix of the next piece, never a piece of its own except at the very end.
        assert all(not p.isspace() for p in pieces[:-1])


@pytest.mark.parametrize("lang", ["fa", "zh", "en"])
def test_span_preserving_on_real_corpora(corpora_dir, lang):
    for path in source_files(corpora_dir / lang):
        for lineno, raw in read_lines(path):
            # Raw lines (not normalized): the segmenter must keep any text, not only clean text.
            assert "".join(segment(raw, lang)) == raw, f"{path}:{lineno}"


def test_chinese_word_may_grow_while_a_dictionary_word_starts_the_text():
    """jieba cuts 织田信 into 织田 | 信 until 长 arrives; a text no dictionary word starts with is settled."""
    assert segment("织田信", "zh") == ["织田", "信"] and segment("织田信长是", "zh") == ["织田信长", "是"]
    assert may_grow("织田信", "zh") and may_grow("北京大", "zh")
    assert not may_grow("织田信长是", "zh") and not may_grow("北京的", "zh")
    assert not may_grow("the weath", "en") and not may_grow("", "zh")
