"""tokenize stage on a slice of the real corpora: artefacts as the contract says, determinism, compression."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPORA

from sokhan.pipeline.config import load_config
from sokhan.pipeline.stage import run_stage
from sokhan import SokhanError
from sokhan.pipeline.stages import tokenize as tokenize_stage
from sokhan.pipeline.stages.tokenize import (
    TokenizeConfig, language_report, report_counts, report_from_counts, segment_stream, shard_dtype, split_block, split_indices,
)
from sokhan.tokenization import Tokenizer, segment
from sokhan.tokenization.segment import words

SLICE = {"fa": ("perdt.txt", 1200), "zh": ("cmrc2018.txt", 120), "en": ("ewt.txt", 400)}
VOCAB = 2000


def _config(tmp: Path, corpus: Path, workers: int):
    toml = "".join(f'[[corpus.paths]]\npath = "{corpus / lang}.txt"\nlang = "{lang}"\n\n' for lang in SLICE)
    toml += f"[tokenize]\nvocab_size = {VOCAB}\nval_fraction = 0.1\nseed = 3\nworkers = {workers}\n"
    (tmp / f"config{workers}.toml").write_text(toml, encoding="utf-8")
    return load_config(tmp / f"config{workers}.toml")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same corpus slice tokenized with 1 and with 2 workers (normalized once); the second also encodes and
    writes 7 lines at a time, so the streamed shards, held-out text and report are built from many batches."""
    corpora_dir = CORPORA  # corpora_dir is function-scoped; the same check, once per module
    if not (corpora_dir / "README.md").exists():
        pytest.skip(f"real corpora not found at {corpora_dir} (they sit beside the checkout in ../shared/corpora)")
    tmp = tmp_path_factory.mktemp("tokenize")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for lang, (name, n) in SLICE.items():
        lines = (corpora_dir / lang / name).read_text(encoding="utf-8").split("\n")[:n]
        (corpus / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = {}
    for workers in (1, 2):
        cfg = _config(tmp, corpus, workers)
        run = tmp / f"run{workers}"
        if workers == 1:
            run_stage("normalize", cfg, run)
        else:
            shutil.copytree(tmp / "run1" / "normalize", run / "normalize")
        with pytest.MonkeyPatch.context() as mp:
            if workers == 2:
                mp.setattr(tokenize_stage, "ENCODE_BATCH", 7)
            run_stage("tokenize", cfg, run)
        out[workers] = run
    return out


def test_artefacts_follow_the_contract(runs):
    d = runs[1] / "tokenize"
    # Nothing else: the scratch files the stage streams through are gone before the manifest hashes the folder.
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == [
        "manifest.json", "meta.json", "report.json", "segmenter.json", "tokenizer.json", "train.bin", "val",
        "val.bin", "val/en.txt", "val/fa.txt", "val/zh.txt"]
    for name in ("tokenizer.json", "segmenter.json", "train.bin", "val.bin", "meta.json", "report.json", "manifest.json"):
        assert (d / name).is_file(), name
    meta = json.loads((d / "meta.json").read_text())
    assert list(meta) == ["dtype", "vocab_size", "special_tokens", "tokens", "split_seed"]
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB and meta["split_seed"] == 3
    assert list(meta["special_tokens"]) == ["<|bos|>", "<|eos|>", "<|pad|>", "<|lang:fa|>", "<|lang:zh|>", "<|lang:en|>"]
    for split in ("train", "val"):
        ids = np.memmap(d / f"{split}.bin", dtype=meta["dtype"], mode="r")
        assert ids.size == sum(meta["tokens"][split].values())
        assert int(ids.max()) < meta["vocab_size"]
        assert list(meta["tokens"][split]) == ["fa", "zh", "en"]


def test_shards_decode_to_the_split_lines(runs):
    """Every line is <|lang:xx|> ids <|eos|>; val decodes to val/<lang>.txt, train + val to the normalized lines."""
    d = runs[1] / "tokenize"
    tok = Tokenizer.load(d / "tokenizer.json")
    meta = json.loads((d / "meta.json").read_text())
    lang_of = {tok.lang_id(lang): lang for lang in ("fa", "zh", "en")}
    decoded = {}
    for split in ("train", "val"):
        ids = np.fromfile(d / f"{split}.bin", dtype=meta["dtype"]).tolist()
        ends = [i for i, t in enumerate(ids) if t == tok.eos_id]
        assert ends and ends[-1] == len(ids) - 1
        start = 0
        for end in ends:
            lang = lang_of[ids[start]]
            decoded.setdefault((split, lang), []).append(tok.decode(ids[start + 1 : end]))
            start = end + 1
    for lang in ("fa", "zh", "en"):
        normalized = (runs[1] / "normalize" / f"{lang}.txt").read_text(encoding="utf-8").split("\n")[:-1]
        val = (d / "val" / f"{lang}.txt").read_text(encoding="utf-8").split("\n")[:-1]
        assert decoded[("val", lang)] == val
        held = split_indices(len(normalized), 0.1, 3, lang)
        assert val == [normalized[i] for i in held]
        assert len(val) == round(0.1 * len(normalized))
        assert sorted(decoded[("train", lang)] + val) == sorted(normalized)
        # The shards are what the public API gives for the same text.
        assert tok.encode(val[0], lang, add_special_tokens=True)[1:-1] == tok.encode_normalized(val[0], lang)


def test_same_output_with_one_or_two_workers(runs):
    for name in ("tokenizer.json", "segmenter.json", "train.bin", "val.bin", "meta.json", "report.json"):
        assert (runs[1] / "tokenize" / name).read_bytes() == (runs[2] / "tokenize" / name).read_bytes(), name


@pytest.mark.parametrize("workers", [1, 2])
def test_segmentation_streams_without_reading_ahead(workers):
    """Lines are taken as the pieces are asked for, a bounded number ahead: an endless input still yields (all of
    it at once, as ``Pool.imap`` alone would queue it, would never return)."""
    import itertools

    from sokhan.tokenization.segment import SegmenterConfig

    taken = 0

    def endless():
        nonlocal taken
        for i in itertools.count():
            taken += 1
            yield f"line {i} of an endless corpus"

    stream = segment_stream(endless(), "en", SegmenterConfig(), workers, chunk=4)
    first = list(itertools.islice(stream, 10))
    stream.close()
    assert first[3].split("\0") == ["line", " 3", " of", " an", " endless", " corpus"]
    assert taken <= 4 * (3 + 16 * workers)  # the 3 chunks read from, and at most 16 per worker ahead of them


def test_report_counts_add_up_over_chunks():
    lines = ["سلام دنیا", "", "کتاب‌ها را خواندم", "a"]
    words_per_line = [line.split() for line in lines]
    ids = [[5, 300, 7], [], [9, 9, 299, 12, 3], [40]]
    fallback = np.zeros(400, dtype=bool)
    fallback[[9, 299]] = True
    whole = language_report(lines, words_per_line, ids, fallback)
    parts = [report_counts(lines[i : i + 2], words_per_line[i : i + 2], ids[i : i + 2], fallback) for i in (0, 2)]
    summed = {k: parts[0][k] + parts[1][k] for k in parts[0]}
    assert report_from_counts(summed) == whole
    assert whole["tokens"] == 9 and whole["byte_fallback_share"] == round(3 / 9, 6) and whole["words"] == 6


def test_tokenizer_file_loads_in_plain_hf(runs):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(runs[1] / "tokenize" / "tokenizer.json"))
    assert hf.get_vocab_size() == VOCAB
    assert hf.decode(hf.encode(["سلام", " دنیا"], is_pretokenized=True).ids) == "سلام دنیا"


def test_report_persian_and_chinese_beat_raw_bytes(runs):
    report = json.loads((runs[1] / "tokenize" / "report.json").read_text())["languages"]
    for lang, r in report.items():
        assert set(r) >= {"chars_per_token", "tokens_per_word", "bytes_per_token", "byte_fallback_share"}
        assert 0.0 <= r["byte_fallback_share"] < 0.5
        assert r["bytes_per_token"] == pytest.approx(r["bytes"] / r["tokens"], rel=1e-3)
    # Raw UTF-8 is 1 byte per token; Persian letters are 2 bytes and Han characters 3, so a tokenizer that
    # learned anything is far above that. "Clear margin": at least twice as compact as raw bytes.
    assert report["fa"]["bytes_per_token"] > 2.0
    assert report["zh"]["bytes_per_token"] > 2.0
    # Chinese tokens per word count jieba's words, not the (clause-long) pieces the model was trained on.
    val = (runs[1] / "tokenize" / "val" / "zh.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert report["zh"]["words"] == sum(words(segment(line, "zh")) for line in val)
    assert report["zh"]["words"] > 1.5 * len(val)


def test_zh_pretokenize_option_checked():
    assert TokenizeConfig().zh_pretokenize == "jieba"
    with pytest.raises(SokhanError, match="tokenize.zh_pretokenize"):
        TokenizeConfig(zh_pretokenize="characters")


def test_split_indices_seeded():
    a = split_indices(1000, 0.05, 0, "fa")
    assert a == split_indices(1000, 0.05, 0, "fa") and len(a) == 50 and a == sorted(a)
    assert a != split_indices(1000, 0.05, 1, "fa")
    assert a != split_indices(1000, 0.05, 0, "zh")
    assert split_indices(1, 0.05, 0, "en") == [] and len(split_indices(3, 0.05, 0, "en")) == 1


@pytest.mark.parametrize("n, block", [(1000, 20), (1003, 20), (10, 20), (2, 5)])
def test_split_indices_in_blocks(n, block):
    """Held out in whole runs of ``block`` lines: every run is all in or all out, the share is kept, and a block
    of 1 is the single-line split."""
    held = split_indices(n, 0.05, 0, "fa", block)
    assert held == sorted(set(held)) and 0 < len(held) < n
    eff = min(split_block(n, 0.05, block), n - 1)
    runs = {i // eff for i in held}
    assert held == [i for r in sorted(runs) for i in range(r * eff, min(n, (r + 1) * eff))]
    total = -(-n // eff)
    assert len(runs) == min(total - 1, max(1, round(total * 0.05)))
    assert split_indices(n, 0.05, 0, "fa", 1) == split_indices(n, 0.05, 0, "fa")
    with pytest.raises(SokhanError, match="tokenize.val_block"):
        TokenizeConfig(val_block=0)


def test_a_block_is_never_more_than_the_share_held_out():
    """A 15-line file with val_block = 20 had 14 lines held out (one run of 14) and 36 tokens left to train on."""
    assert split_block(15, 0.05, 20) == 1 and len(split_indices(15, 0.05, 0, "fa", 20)) == 1
    assert split_block(100, 0.1, 20) == 10 and len(split_indices(100, 0.1, 0, "fa", 20)) == 10
    assert split_block(43726, 0.05, 20) == 20  # the corpora's split is unchanged


def test_shard_dtype():
    assert shard_dtype(8000) == np.uint16 and shard_dtype(2**16) == np.uint16
    assert shard_dtype(2**16 + 1) == np.uint32


def test_a_corpus_too_small_for_the_vocabulary_says_so(tmp_path, capsys):
    """The bundled sample cannot fill 60000 tokens; the log used to announce 'vocabulary 60000' and nothing else."""
    from sokhan.pipeline.cli import main

    run = tmp_path / "run"
    assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize,tokenize",
                 "--set", "tokenize.vocab_size=60000"]) == 0
    got = json.loads((run / "tokenize" / "meta.json").read_text())["vocab_size"]
    assert got < 60000
    assert f"the corpus gave {got} tokens, fewer than tokenize.vocab_size = 60000" in capsys.readouterr().err


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("vocab_size"), lambda m: m.update(vocab_size="8000"), lambda m: m.update(special_tokens={}),
    lambda m: m.pop("dtype"), lambda m: m.update(dtype="nonsense"),
])
def test_a_damaged_meta_json_is_named_in_one_line(tmp_path, edit):
    """Later stages read meta.json's fields; a hand-edited one ended in a KeyError traceback inside evaluate."""
    from sokhan.pipeline.stages.tokenize import read_meta

    good = {"dtype": "uint16", "vocab_size": 300, "special_tokens": {"<|eos|>": 1}, "tokens": {}}
    (tmp_path / "meta.json").write_text(json.dumps(good))
    assert read_meta(tmp_path) == good
    edit(good)
    (tmp_path / "meta.json").write_text(json.dumps(good))
    with pytest.raises(SokhanError, match=r"meta.json: field '\w+' is missing or malformed .*sokhan tokenize --force"):
        read_meta(tmp_path)


def test_a_one_language_corpus_is_learned_unweighted(tmp_path, capsys):
    """With Chinese alone, the default zh = 2 repeated every line: each piece seen once passed min_frequency = 2.
    Weights share the vocabulary out between languages, so one language is learned as it is, whatever its weight."""
    from sokhan.pipeline.cli import main

    corpus = Path(__file__).resolve().parents[1] / "data" / "sample" / "zh.txt"
    vocabs = []
    for weight in ("2.0", "1.0", "0.5"):
        run = tmp_path / f"run{weight}"
        assert main(["run", "sample", "--run-dir", str(run), "--stages", "normalize,tokenize",
                     "--set", f'corpus.paths=[{{path = "{corpus}", lang = "zh"}}]', "--set", "tokenize.vocab_size=600",
                     "--set", f"tokenize.lang_weights={{zh = {weight}}}"]) == 0
        assert "language weights" not in capsys.readouterr().err
        vocabs.append((run / "tokenize" / "tokenizer.json").read_bytes())
    assert vocabs[0] == vocabs[1] == vocabs[2]
