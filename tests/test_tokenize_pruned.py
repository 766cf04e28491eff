"""Pruned BPE and language weights, on a slice of the real corpora: exact vocabulary size, encoding by the fewest
tokens (checked against a brute-force shortest path), and the vocabulary a language weight buys."""

from __future__ import annotations

import math

import pytest
from conftest import CORPORA

from sokhan import SokhanError
from sokhan.pipeline.config import load_config
from sokhan.pipeline.stages.tokenize import MAX_LANG_WEIGHT, TokenizeConfig, weighted_lines
from sokhan.tokenization import SPECIAL_TOKENS, Tokenizer, normalize, pretokenize
from sokhan.tokenization.prune import shortest_path_model

SLICE = {"fa": ("perdt.txt", 1500), "zh": ("cmrc2018.txt", 150), "en": ("ewt.txt", 600)}
VOCAB = 1500


@pytest.fixture(scope="module")
def data() -> dict[str, dict]:
    """Per language: training pieces (first 90 % of the slice) and held-out lines with their pieces."""
    if not (CORPORA / "README.md").exists():
        pytest.skip(f"real corpora not found at {CORPORA} (they sit beside the checkout in ../shared/corpora)")
    out = {}
    for lang, (name, n) in SLICE.items():
        lines = [normalize(t, lang) for t in (CORPORA / lang / name).read_text(encoding="utf-8").split("\n")[:n]]
        lines = [t for t in lines if t]
        k = len(lines) * 9 // 10
        out[lang] = {"train": [pretokenize(t, lang) for t in lines[:k]], "val": lines[k:],
                     "val_pieces": [pretokenize(t, lang) for t in lines[k:]]}
    return out


_TRAINED: dict = {}


def trained(data, model: str = "pruned-bpe", **weights: float) -> Tokenizer:
    """A tokenizer of the slice, each language's lines repeated by its weight (as the tokenize stage does), cached."""
    key = (model, tuple(sorted(weights.items())))
    if key not in _TRAINED:
        lines = [p for lang, d in data.items() for p in weighted_lines(d["train"], weights.get(lang, 1.0))]
        _TRAINED[key] = Tokenizer.train(iter(lines), VOCAB, model=model)
    return _TRAINED[key]


def chars_per_token(tok: Tokenizer, d: dict) -> float:
    return sum(map(len, d["val"])) / sum(map(len, tok.encode_pieces(d["val_pieces"])))


def han_tokens(tok: Tokenizer) -> int:
    """Vocabulary tokens that are whole characters with at least one Han character."""
    n = 0
    for i in range(tok.vocab_size):
        try:
            text = tok.id_to_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            continue
        n += any("\u4e00" <= c <= "\u9fff" for c in text)
    return n


def fewest_tokens(piece: str, vocab: set[str]) -> int:
    """Reference: the fewest tokens of ``vocab`` that spell ``piece`` (in GPT-2's byte alphabet), by brute DP."""
    from sokhan.tokenization.tokenizer import _BYTE_OF

    char_of = {b: c for c, b in _BYTE_OF.items()}
    s = "".join(char_of[b] for b in piece.encode("utf-8"))
    best = [0] + [math.inf] * len(s)
    for end in range(1, len(s) + 1):
        best[end] = min(best[start] + 1 for start in range(end) if s[start:end] in vocab)
    return best[-1]


def test_pruned_vocabulary_has_exactly_the_size_asked(data):
    from tokenizers import pre_tokenizers

    tok = trained(data)
    assert tok.vocab_size == VOCAB
    assert sorted(tok.special_tokens.values()) == list(range(len(SPECIAL_TOKENS)))
    vocab = tok.hf.get_vocab(with_added_tokens=False)
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)  # every text stays encodable
    # The BPE candidates it came from were more: pruning dropped some (and kept none BPE did not propose).
    bpe = Tokenizer.train(iter(p for d in data.values() for p in d["train"]), VOCAB + VOCAB // 8, model="bpe")
    assert set(vocab) < set(bpe.hf.get_vocab(with_added_tokens=False))


def test_pruned_encodes_each_piece_into_the_fewest_tokens(data):
    tok = trained(data)
    vocab = {t for t in tok.hf.get_vocab(with_added_tokens=False) if t not in SPECIAL_TOKENS}
    checked = 0
    for lang, d in data.items():
        for pieces in d["val_pieces"][:40]:
            for piece, ids in zip(pieces, tok.encode_pieces([[p] for p in pieces])):
                assert len(ids) == fewest_tokens(piece, vocab), (lang, piece)
                assert b"".join(tok.id_to_bytes(i) for i in ids) == piece.encode("utf-8")
                checked += 1
    assert checked > 1000


def test_shortest_path_never_longer_than_bpe_merges(data):
    """Over the very same vocabulary the fewest-token path is at most as long as BPE's merges, piece by piece."""
    from tokenizers import Tokenizer as HFTokenizer

    bpe = trained(data, "bpe")
    hf = HFTokenizer.from_str(bpe.hf.to_str())
    tokens = [t for t, _ in sorted(hf.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])]
    hf.model = shortest_path_model([t for t in tokens if t not in SPECIAL_TOKENS], SPECIAL_TOKENS)
    shortest = Tokenizer(hf, bpe.normalization, bpe.segmenter)
    assert shortest.vocab_size == bpe.vocab_size
    total_bpe = total_short = 0
    for d in data.values():
        pieces = [p for line in d["val_pieces"] for p in line]
        for a, b in zip(bpe.encode_pieces([[p] for p in pieces]), shortest.encode_pieces([[p] for p in pieces])):
            assert len(b) <= len(a)
            total_bpe, total_short = total_bpe + len(a), total_short + len(b)
    assert total_short < total_bpe  # (on the whole corpora bundle at 8000: 1 % fewer on Persian and English)


def test_pruned_compresses_persian_and_english_better_than_bpe(data):
    pruned, bpe = trained(data), trained(data, "bpe")
    for lang in ("fa", "en"):
        assert chars_per_token(pruned, data[lang]) > 1.01 * chars_per_token(bpe, data[lang]), lang


def test_chinese_weight_buys_chinese_vocabulary(data):
    """A weight is a trade inside one vocabulary: Chinese gains Han tokens and compression, Persian loses them."""
    plain, heavy = trained(data), trained(data, zh=3.0)
    assert han_tokens(heavy) > han_tokens(plain) + 100
    assert chars_per_token(heavy, data["zh"]) > 1.03 * chars_per_token(plain, data["zh"])
    assert chars_per_token(heavy, data["fa"]) < chars_per_token(plain, data["fa"])


@pytest.mark.parametrize("model", ["pruned-bpe", "unigram"])
def test_special_token_strings_are_never_special_ids(data, model):
    """Unigram models hold the special tokens in their vocabulary: no path may take them (decode would drop them)."""
    tok = trained(data, model)
    pieces = [*SPECIAL_TOKENS, " <|eos|>"]
    ids = tok.hf.encode(pieces, is_pretokenized=True, add_special_tokens=False).ids
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == "".join(pieces)


def test_weighted_lines_repeat_evenly():
    lines = list("abcdefgh")
    assert list(weighted_lines(lines, 1.0)) == lines
    assert list(weighted_lines(lines, 2.0)) == [x for x in lines for _ in range(2)]
    assert list(weighted_lines(lines[:4], 2.5)) == list("aabbbccddd")
    assert list(weighted_lines(lines, 0.5)) == list("bdfh")
    assert len(list(weighted_lines(lines * 25, 1.75))) == math.floor(200 * 1.75)


def test_lang_weights_config():
    assert TokenizeConfig().lang_weights == {"zh": 2.0} and TokenizeConfig().model == "pruned-bpe"
    cfg = load_config("corpora", ["tokenize.lang_weights={zh = 3, en = 0.5}"])
    assert cfg.tokenize.lang_weights == {"zh": 3.0, "en": 0.5}
    for bad, match in [({"de": 2.0}, "lang_weights.de: unknown language"), ({"fa": 0.0}, r"lang_weights.fa = 0.0 must be in"),
                       ({"en": -1.0}, "lang_weights.en"), ({"zh": math.inf}, "lang_weights.zh"),
                       ({"zh": MAX_LANG_WEIGHT + 1}, "lang_weights.zh")]:
        with pytest.raises(SokhanError, match=match):
            TokenizeConfig(lang_weights=bad)
    with pytest.raises(SokhanError, match="tokenize.model"):
        load_config("corpora", ["tokenize.model=wordpiece"])
