"""Tokenizer: lossless round trip, special tokens, files that plain HF tokenizers loads; pruned BPE (the default),
BPE and Unigram."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sokhan import SokhanError
from sokhan.tokenization import SPECIAL_TOKENS, SegmenterConfig, Tokenizer, normalize, pretokenize
from sokhan.tokenization.corpus import read_lines, source_files

TEXT = {
    "fa": ["کتاب‌ها را در کتابخانه خواندم و به خانه رفتم.", "امروز هوا بسیار خوب است و ما به پارک می‌رویم.",
           "دانشجویان در دانشگاه تهران درس می‌خوانند."],
    "zh": ["我们今天去公园散步，天气非常好。", "自然语言处理是人工智能的一个重要方向。", "北京是中国的首都，有很多历史古迹。"],
    "en": ["The weather is very nice today, so we walk in the park.", "Natural language processing is a field of AI.",
           "Students read books in the university library."],
}


def _pieces(segmenter=SegmenterConfig()):
    for _ in range(20):
        for lang, lines in TEXT.items():
            for line in lines:
                yield pretokenize(normalize(line, lang), lang, segmenter)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(_pieces(), vocab_size=1000)


@pytest.fixture(scope="module")
def runs_tok():
    seg = SegmenterConfig(zh_pretokenize="runs")
    return Tokenizer.train(_pieces(seg), vocab_size=1000, segmenter=seg)


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train(_pieces(), vocab_size=1000, model="bpe")


@pytest.fixture(scope="module")
def unigram():
    return Tokenizer.train(_pieces(), vocab_size=1000, model="unigram")


def test_vocab_and_special_tokens(tok):
    assert tok.vocab_size <= 1000
    assert list(tok.special_tokens) == list(SPECIAL_TOKENS)
    assert sorted(tok.special_tokens.values()) == list(range(len(SPECIAL_TOKENS)))
    assert tok.lang_id("zh") == tok.special_tokens["<|lang:zh|>"]
    with pytest.raises(SokhanError, match="no token"):
        tok.lang_id("de")


def test_training_learned_words(tok):
    """Frequent words of the training text are single tokens; merges never cross a piece."""
    assert len(tok.encode("کتاب", "fa")) == 1
    assert len(tok.encode("The weather", "en")) == 2  # The | " weather"
    assert len(tok.encode("我们今天去公园散步", "zh")) == 5  # jieba's words: a token never spans two


def test_chinese_pretokenization_options(tok, runs_tok):
    """jieba's words (default) bound every token, whatever the training; runs let a frequent phrase be one token."""
    text = "我们今天去公园散步"
    assert runs_tok.pretokenize(text, "zh") == [text]
    assert tok.pretokenize(text, "zh") == tok.segment(text, "zh") == ["我们", "今天", "去", "公园", "散步"]
    assert tok.segment(text, "zh") == runs_tok.segment(text, "zh")  # words do not depend on the option
    assert len(runs_tok.encode(text, "zh")) < len(tok.encode(text, "zh")) == 5
    assert runs_tok.decode(runs_tok.encode(text, "zh")) == tok.decode(tok.encode(text, "zh")) == text
    with pytest.raises(SokhanError, match="zh_pretokenize"):
        SegmenterConfig(zh_pretokenize="words")


def test_every_single_id_decodes(tok):
    """Labels decode one id at a time: never an error; a piece of a UTF-8 character comes out as U+FFFD."""
    partial = 0
    for i in range(tok.vocab_size):
        text = tok.decode([i])
        try:
            whole = tok.id_to_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            partial += 1
            assert "\ufffd" in text, i
        else:
            assert text == ("" if i in tok.special_tokens.values() else whole), i
    assert partial > 0  # the byte alphabet alone holds 128 bytes that are no character on their own


def test_special_token_strings_in_text_are_text(tok):
    text = "say <|eos|> and <|lang:fa|>"
    ids = tok.encode(text, "en")
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text


def test_add_special_tokens_frames_like_the_shards(tok):
    ids = tok.encode("hello world", "en", add_special_tokens=True)
    assert ids[0] == tok.lang_id("en") and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "hello world"
    assert tok.decode(ids, skip_special_tokens=False) == "<|lang:en|>hello world<|eos|>"


def test_id_to_bytes_concatenates_to_the_text(tok):
    text = normalize("北京 کتاب naïve 😀", "fa")
    ids = tok.encode(text, "fa")
    assert b"".join(tok.id_to_bytes(i) for i in ids).decode("utf-8") == text
    with pytest.raises(SokhanError, match="outside the vocabulary"):
        tok.id_to_bytes(tok.vocab_size)


def test_piece_cache_matches_the_model_when_full(tok, monkeypatch):
    import sokhan.tokenization.tokenizer as tokenizer_module

    texts = [pretokenize(normalize(t, lang), lang) for lang, lines in TEXT.items() for t in lines]
    plain = [e.ids for e in tok.hf.encode_batch(texts, is_pretokenized=True, add_special_tokens=False)]
    monkeypatch.setattr(tokenizer_module, "_CACHE_SIZE", 8)  # smaller than one line's pieces: cleared every call
    monkeypatch.setattr(tokenizer_module, "_CHUNK", 3)  # several model calls per batch
    tok._cache.clear()
    assert [tok.encode_pieces([t])[0] for t in texts] == plain
    assert tok.encode_pieces(texts) == plain
    tok._cache.clear()


def test_save_load_and_plain_hf_file(tok, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    text = "کتاب‌ها 我们今天 weather"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.special_tokens == tok.special_tokens
    side = json.loads((tmp_path / "segmenter.json").read_text())
    assert side["normalize"] == {"digits": "persian", "remove_diacritics": True}
    assert side["segment"] == {"zh_hmm": False, "zh_pretokenize": "jieba"}
    # The HF file alone, on our pre-tokenization, gives the same ids and decodes back.
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    pieces = pretokenize("我们今天去公园", "zh")
    assert hf.encode(pieces, is_pretokenized=True).ids == tok.encode("我们今天去公园", "zh")
    assert hf.decode(hf.encode(pieces, is_pretokenized=True).ids) == "我们今天去公园"


def test_segmenter_file_without_zh_pretokenize_means_jieba(tok, tmp_path):
    """Tokenizers saved before the option existed were trained on jieba's words and must keep encoding so."""
    tok.save(tmp_path)
    side = json.loads((tmp_path / "segmenter.json").read_text())
    del side["segment"]["zh_pretokenize"]
    (tmp_path / "segmenter.json").write_text(json.dumps(side))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.segmenter.zh_pretokenize == "jieba"
    assert loaded.encode("我们今天去公园", "zh") == tok.encode("我们今天去公园", "zh")


def test_load_errors(tok, tmp_path):
    with pytest.raises(SokhanError, match="no such file"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "segmenter.json").write_text('{"format": "other"}')
    with pytest.raises(SokhanError, match="not a sokhan segmenter file"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path)
    side = json.loads((tmp_path / "segmenter.json").read_text())
    side["segment"]["zh_pretokenize"] = "words"
    (tmp_path / "segmenter.json").write_text(json.dumps(side))
    with pytest.raises(SokhanError, match="zh_pretokenize"):
        Tokenizer.load(tmp_path)


any_text = st.text(st.characters(codec=None), max_size=60)


@settings(max_examples=150, deadline=None)
@given(text=any_text, lang=st.sampled_from(["fa", "zh", "en", None]))
def test_lossless_arbitrary_unicode(tok, text, lang):
    assert tok.decode(tok.encode(text, lang)) == tok.normalize(text, lang)


@settings(max_examples=60, deadline=None)
@given(text=any_text, lang=st.sampled_from(["fa", "zh", "en"]))
def test_lossless_unigram(unigram, text, lang):
    assert unigram.decode(unigram.encode(text, lang)) == unigram.normalize(text, lang)


@settings(max_examples=60, deadline=None)
@given(text=any_text, lang=st.sampled_from(["fa", "zh", "en"]))
def test_lossless_bpe(bpe, text, lang):
    assert bpe.decode(bpe.encode(text, lang)) == bpe.normalize(text, lang)


def test_models_file_kinds(tok, bpe, unigram):
    """The default stores its pruned vocabulary as a Unigram model (no merges to replay); model="bpe" keeps HF's BPE."""
    kinds = {name: json.loads(t.hf.to_str())["model"]["type"] for name, t in (("pruned", tok), ("bpe", bpe), ("unigram", unigram))}
    assert kinds == {"pruned": "Unigram", "bpe": "BPE", "unigram": "Unigram"}
    with pytest.raises(SokhanError, match="tokenize.model"):
        Tokenizer.train(_pieces(), vocab_size=1000, model="wordpiece")


def test_lossless_and_idempotent_on_every_real_line(tok, corpora_dir):
    """Every line of ../shared/corpora: decode(encode(t)) == normalize(t), and normalize is idempotent.

    Batched: normalize and pre-tokenize in Python, the model over all lines at once; every 97th line also goes
    through ``encode`` itself to check that it is this composition, and every 10th through the plain HF
    encoder to check the piece cache.
    """
    for lang in ("fa", "zh", "en"):
        raws, norms = [], []
        for path in source_files(corpora_dir / lang):
            for lineno, raw in read_lines(path):
                once = tok.normalize(raw, lang)
                assert tok.normalize(once, lang) == once, f"not idempotent: {path}:{lineno}"
                raws.append(raw)
                norms.append(once)
        pieces = [tok.pretokenize(t, lang) for t in norms]
        ids = tok.encode_pieces(pieces)
        # The piece cache gives what the HF model gives on the whole pre-tokenized line.
        hf_ids = [e.ids for e in tok.hf.encode_batch(pieces[::10], is_pretokenized=True, add_special_tokens=False)]
        assert ids[::10] == hf_ids
        for i, (line, line_ids) in enumerate(zip(norms, ids)):
            assert tok.decode(line_ids) == line, f"{lang} line {i}"
            if i % 97 == 0:
                assert tok.encode(raws[i], lang) == line_ids


def test_a_different_hazm_or_jieba_than_in_training_is_said_once(tok, tmp_path, capsys):
    """The bundle's install pins nothing: hazm 0.9.4 loaded a tokenizer trained under 0.10.0 without a word, though
    their rules decide the pieces the ids were learned on."""
    tok.save(tmp_path)
    capsys.readouterr()
    Tokenizer.load(tmp_path)
    assert capsys.readouterr().err == ""  # the versions it was written with
    side = tmp_path / "segmenter.json"
    meta = json.loads(side.read_text(encoding="utf-8"))
    meta["versions"]["hazm"] = "0.9.4"
    side.write_text(json.dumps(meta), encoding="utf-8")
    Tokenizer.load(tmp_path)
    Tokenizer.load(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with hazm 0.9.4 (here 0.10.0)" in err[0] and "segmented differently" in err[0]
