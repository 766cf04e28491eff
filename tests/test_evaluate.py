"""The evaluate stage end to end on a miniature run directory (tokenizer, shards and model made in the test)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sokhan.pipeline.cli import main
from sokhan.pipeline.config import RunConfig, to_dict
from sokhan.pipeline.stage import run_stage, save_run_config, write_json
from sokhan.pipeline.stages.evaluate import EvaluateConfig
from sokhan.tokenization import SegmenterConfig, Tokenizer, segment

TRAIN = {
    "fa": ["در جنگل یک شیر درنده را دیدم", "کتاب‌ها را خواندم", "شیر در جنگل بود", "من کتاب را دیدم"] * 6,
    "en": ["the cat sat on the mat .", "a dog ran in the park", "the cat ran to the dog"] * 6,
}
VAL = {"fa": ["شیر را در جنگل دیدم", "کتاب را خواندم"], "en": ["the dog sat on the mat .", "a cat ran"]}


def make_run(root: Path, arch: str) -> tuple[Path, RunConfig]:
    """tokenize/ and train/ outputs, as the stages write them, with an untrained model of ``arch``."""
    import torch

    from sokhan.pipeline.models import ModelConfig, build
    from sokhan.pipeline.train.checkpoint import save_model_folder

    run = root / arch
    tok_dir, train_dir = run / "tokenize", run / "train"
    (tok_dir / "val").mkdir(parents=True)
    pieces = [p for lang, lines in TRAIN.items() for line in lines for p in segment(line, lang)]
    tok = Tokenizer.train(iter([pieces]), vocab_size=300, min_frequency=2, segmenter=SegmenterConfig())
    tok.save(tok_dir)
    ids = [i for lang, lines in TRAIN.items() for line in lines for i in tok.encode(line, lang, add_special_tokens=True)]
    np.array(ids, dtype=np.uint16).tofile(tok_dir / "train.bin")
    for lang, lines in VAL.items():
        (tok_dir / "val" / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json(tok_dir / "meta.json", {"dtype": "uint16", "vocab_size": tok.vocab_size, "special_tokens": tok.special_tokens})
    write_json(tok_dir / "manifest.json", {"outputs": {"train.bin": "x"}})

    config = RunConfig(evaluate=EvaluateConfig(stride=8, window=16, nextword_words=5, nextword_beam=3))
    config.model = ModelConfig(arch=arch, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    config.train.seq_len = 16
    torch.manual_seed(0)
    mcfg = config.model.resolve(tok.vocab_size)
    stored = to_dict(config)
    stored["model"] = to_dict(mcfg)
    save_model_folder(train_dir, build(mcfg), stored)
    write_json(train_dir / "manifest.json", {"outputs": {"model.safetensors": "y"}})
    save_run_config(run, config)
    return run, config


@pytest.mark.parametrize("arch", ["mamba", "transformer"])
def test_stage_writes_report(tmp_path, arch, capsys, monkeypatch):
    run, config = make_run(tmp_path, arch)
    monkeypatch.chdir(tmp_path)
    run_stage("evaluate", config, Path(run.name))  # as typed: a path relative to the current folder
    report = json.loads((run / "evaluate" / "report.json").read_text(encoding="utf-8"))
    assert set(report["languages"]) == {"fa", "en"}
    assert report["model"]["arch"] == arch
    assert report["model"]["train_dir"] == str(run.resolve() / "train")  # not "run/train", from anywhere
    for lang, r in report["languages"].items():
        m, n = r["model"], r["ngram"]
        assert m["tokens"] == n["tokens"] > 0 and m["characters"] == sum(len(s) + 1 for s in VAL[lang])
        # An untrained model is close to uniform over the vocabulary: NLL ≈ ln V.
        assert abs(m["nll_per_token"] - np.log(300)) < 0.5
        assert m["bits_per_character"] == pytest.approx(m["nll_per_token"] * m["tokens"] / np.log(2) / m["characters"])
        # The n-gram model has seen these words: it beats the untrained network.
        assert n["bits_per_character"] < m["bits_per_character"] and r["bpc_reduction"] < 0
        assert 0 <= m["top1"] <= m["top5"] <= 1 and 0 <= m["nextword_top1"] <= m["nextword_top5"] <= 1
        assert m["nextword_words"] == n["nextword_words"] == 5  # the n-gram searched at the same word starts
        assert 0 <= n["nextword_top1"] <= n["nextword_top5"] <= 1
    md = (run / "evaluate" / "report.md").read_text(encoding="utf-8")
    assert "| fa | " in md and "5-gram KN" in md
    assert "5% of each language's lines, single lines" in report["settings"]["source"] in md  # how it was held out
    assert "bpc" in capsys.readouterr().out  # the table on the terminal
    # Up to date, the stage is not run again, but its table still is what the command prints (it printed nothing).
    run_stage("evaluate", config, run)
    out, err = capsys.readouterr()
    assert "evaluate: up to date, skipped" in err and "bpc" in out and "| fa | " not in out


def test_up_to_date_evaluate_prints_its_stored_report_as_json(tmp_path, capsys):
    run, config = make_run(tmp_path, "mamba")
    save_run_config(run, config)
    assert main(["evaluate", "--run-dir", str(run)]) == 0
    first = json.loads((run / "evaluate" / "report.json").read_text(encoding="utf-8"))
    capsys.readouterr()
    assert main(["evaluate", "--run-dir", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == first


def test_adhoc_text_leaves_the_run_config_alone(tmp_path):
    """`--text` prints and writes nothing, and that includes the run's config.json under --set."""
    run, _ = make_run(tmp_path, "mamba")
    before = (run / "config.json").read_bytes()
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat .\n", encoding="utf-8")
    assert main(["evaluate", "--run-dir", str(run), "--text", str(text), "--set", "train.steps=77"]) == 0
    assert (run / "config.json").read_bytes() == before


def test_report_says_how_the_text_was_held_out(tmp_path):
    from sokhan.pipeline.stages.evaluate import evaluate

    run, config = make_run(tmp_path, "mamba")
    stored = json.loads((run / "train" / "config.json").read_text(encoding="utf-8"))
    stored["tokenize"]["val_block"] = 20
    write_json(run / "train" / "config.json", stored)
    report = evaluate(config.evaluate, run / "tokenize", run / "train")
    assert report["settings"]["source"].endswith("5% of each language's lines, in runs of 20 consecutive lines")


def test_adhoc_text_prints_and_writes_nothing(tmp_path, capsys):
    run, _ = make_run(tmp_path, "mamba")
    text = tmp_path / "t.txt"
    text.write_text("در جنگل یک شیر درنده را دیدم\n\nthe cat sat on the mat .\n", encoding="utf-8")
    assert main(["evaluate", "--run-dir", str(run), "--text", str(text), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["source"] == "given texts"
    assert set(report["languages"]) == {"fa", "en"}  # detected per line
    assert report["languages"]["fa"]["model"]["characters"] == len("در جنگل یک شیر درنده را دیدم") + 1
    assert not (run / "evaluate").exists()

    assert main(["evaluate", "--run-dir", str(run), "--text", str(text), "--lang", "en"]) == 0
    out = capsys.readouterr().out
    assert "en" in out and "fa " not in out

    cyrillic = tmp_path / "ru.txt"
    cyrillic.write_text("Привет мир\nкак дела\n", encoding="utf-8")  # used to say "no non-empty lines"
    assert main(["evaluate", "--run-dir", str(run), "--text", str(cyrillic)]) == 2
    assert "none of its 2 lines has Persian, Chinese or Latin words" in capsys.readouterr().err
    text.write_text("the cat sat on the mat .\nПривет мир\n", encoding="utf-8")
    assert main(["evaluate", "--run-dir", str(run), "--text", str(text)]) == 0
    assert "left out 1 line(s)" in capsys.readouterr().err


def test_windows_overlap_by_half_unless_told(tmp_path):
    """The stride was 128 whatever the window: with the sample's 128-token windows the first tokens of each window
    were scored almost without context."""
    assert EvaluateConfig().stride is None
    run, config = make_run(tmp_path, "mamba")
    config.evaluate.stride, config.evaluate.window = None, 10
    run_stage("evaluate", config, run)
    settings = json.loads((run / "evaluate" / "report.json").read_text(encoding="utf-8"))["settings"]
    assert (settings["window"], settings["stride"]) == (10, 5)
    config.evaluate.stride = 3
    run_stage("evaluate", config, run)
    settings = json.loads((run / "evaluate" / "report.json").read_text(encoding="utf-8"))["settings"]
    assert (settings["window"], settings["stride"]) == (10, 3)


def test_bad_flags_are_one_line(tmp_path, capsys):
    run, _ = make_run(tmp_path, "mamba")
    assert main(["evaluate", "--run-dir", str(run), "--lang", "fa"]) == 2
    assert "--lang needs --text" in capsys.readouterr().err
    assert main(["evaluate", "--run-dir", str(run), "--graph", "decoder.int8.onnx"]) == 2
    assert "--graph needs --bundle" in capsys.readouterr().err
    assert main(["evaluate", "--run-dir", str(run), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["evaluate", "--run-dir", str(run), "--set", "evaluate.stride=0"]) == 2
    assert "evaluate.stride" in capsys.readouterr().err
    assert main(["evaluate", "--run-dir", str(run), "--set", "evaluate.window=1", "--set", "evaluate.stride=1"]) == 2
    assert "evaluate.window = 1 must be ≥ 2" in capsys.readouterr().err
    assert main(["evaluate", "--run-dir", str(run), "--text", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("the cat\nthe dog\ncaf\xe9\n".encode("latin-1"))
    assert main(["evaluate", "--run-dir", str(run), "--text", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 3: not UTF-8 (byte 0xe9)" in err and "Traceback" not in err


def test_stale_model_or_foreign_bundle_is_refused(tmp_path, monkeypatch):
    """A model older than its run's tokenizer, or a bundle of another run, would score with the wrong ids."""
    import sokhan.export.runtime as runtime
    from sokhan import SokhanError
    from sokhan.pipeline.stages.evaluate import evaluate

    run, config = make_run(tmp_path, "mamba")
    vocab = json.loads((run / "tokenize" / "meta.json").read_text(encoding="utf-8"))["vocab_size"]

    class Loaded:  # all the check needs of a Decoder: it loads, and its vocabulary size matches
        config = {"vocab_size": vocab}

        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(runtime, "Decoder", Loaded)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    foreign = json.loads((run / "tokenize" / "tokenizer.json").read_text(encoding="utf-8"))
    pieces = foreign["model"]["vocab"]  # the default tokenizer is stored as a Unigram model: a list of pieces
    pieces[-1], pieces[-2] = pieces[-2], pieces[-1]  # same size, two ids swapped
    (bundle / "tokenizer.json").write_text(json.dumps(foreign), encoding="utf-8")
    with pytest.raises(SokhanError, match="not this run's"):
        evaluate(config.evaluate, run / "tokenize", run / "train", bundle=bundle)
    # The run's own tokenizer, another run's model (the transformer exported from a sibling run): 30 % "agreement".
    shutil.copyfile(run / "tokenize" / "tokenizer.json", bundle / "tokenizer.json")
    Loaded.config = {"vocab_size": vocab, "model": {"arch": "transformer", "vocab_size": vocab}}
    with pytest.raises(SokhanError, match=r"its model is not this run's \(arch = 'transformer' in the bundle, 'mamba'"):
        evaluate(config.evaluate, run / "tokenize", run / "train", bundle=bundle)

    # The run's own bundle, exported before train ran again (its manifest records an older train output).
    own = run / "export" / "bundle"
    shutil.copytree(bundle, own)
    write_json(run / "export" / "manifest.json", {"stage": "export", "outputs": {},
                                                   "inputs": {"upstream": {"train": "an older output"}}})
    with pytest.raises(SokhanError, match=r"export: made from an older train output .*run `sokhan run"):
        evaluate(config.evaluate, run / "tokenize", run / "train", bundle=own)

    smaller = Tokenizer.train(iter([["a", "b", "c"]]), vocab_size=vocab - 20, min_frequency=1, segmenter=SegmenterConfig())
    smaller.save(run / "tokenize")  # tokenize ran again after train
    with pytest.raises(SokhanError, match="model is stale"):
        evaluate(config.evaluate, run / "tokenize", run / "train")


class StepDecoder:
    """Stands in for ``runtime.Decoder``: steps the PyTorch model itself, logits optionally offset at one position."""

    bundle = Path("fake-bundle")
    graph_file = "fake.onnx"
    max_context = None

    def __init__(self, model, bump_at: int | None = None):
        self.model, self.bump_at, self.t = model, bump_at, 0

    def init_state(self, batch_size):
        return self.model.init_state(batch_size)

    def step(self, ids, state):
        import torch

        with torch.no_grad():
            logits, state = self.model.step(torch.as_tensor(ids), state)
        logits = logits.numpy().copy()
        if self.t == self.bump_at:
            logits[0, 0] += 100.0  # token 0 becomes the top prediction
        self.t += 1
        return logits, state


def test_onnx_agreement_measures_step_against_forward():
    import torch

    from sokhan.pipeline.models import ModelConfig, build
    from sokhan.pipeline.stages.evaluate import onnx_agreement

    torch.manual_seed(0)
    model = build(ModelConfig(arch="mamba", d_model=16, n_layers=2, vocab_size=30).resolve()).eval()
    tokens = np.random.default_rng(0).integers(1, 30, size=20)
    same = onnx_agreement(StepDecoder(model), model, tokens, "cpu")
    assert same["tokens"] == 20 and same["top1_agreement"] == 1.0 and same["max_logit_diff"] < 1e-4
    off = onnx_agreement(StepDecoder(model, bump_at=7), model, tokens, "cpu")
    assert off["top1_agreement"] == pytest.approx(19 / 20) and off["max_logit_diff"] == pytest.approx(100.0, abs=1e-3)
    # The next-token NLL on the same tokens, in float64 from each side's logits: equal for the same model; the offset
    # logit at step 7 makes token 0 near-certain there, so the ONNX side pays ~100 nats at that step (/ 19 targets).
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.as_tensor(tokens)[None])[0].double(), -1)
    want = float(-logp[torch.arange(19), torch.as_tensor(tokens[1:])].mean())
    assert same["nll_per_token"]["torch"] == pytest.approx(want, abs=1e-9)
    assert same["nll_per_token"]["onnx"] == pytest.approx(want, abs=1e-5)
    assert off["nll_per_token"]["onnx"] - off["nll_per_token"]["torch"] == pytest.approx(100 / 19, rel=0.05)
    assert same["graph"] == "fake.onnx"
    # With the table's targets (the <|lang|> tags left out), over those alone: it had averaged over every token.
    targets = np.array([1, 2, 3, 5, 8, 13, 19, 25])  # 25 lies past the stepped tokens
    chosen = onnx_agreement(StepDecoder(model), model, tokens, "cpu", targets)
    want = float(-logp[torch.as_tensor(targets[:-1] - 1), torch.as_tensor(tokens[targets[:-1]])].mean())
    assert chosen["nll_per_token"]["torch"] == pytest.approx(want, abs=1e-9)


def test_adhoc_text_needs_no_writable_run_directory(tmp_path, capsys):
    """evaluate --text only reads: where the lock file cannot be written (a read-only mount; here a folder in its
    place) it goes on without the lock, where an OSError traceback ended it. A stage there is one line."""
    run, _ = make_run(tmp_path, "mamba")
    (run / ".sokhan.lock").mkdir()
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat .\n", encoding="utf-8")
    assert main(["evaluate", "--run-dir", str(run), "--text", str(text), "--json"]) == 0
    assert "en" in json.loads(capsys.readouterr().out)["languages"]
    assert main(["evaluate", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sokhan: error: {run}: cannot write its lock file .sokhan.lock (Is a directory)"


def test_adhoc_text_lines_end_at_newlines_only_and_may_normalize_to_nothing(tmp_path, capsys):
    """U+2028 inside a line is a space to the normalizer, not a line break (str.splitlines made it one: an extra
    line tag and <|eos|>, other figures); a file whose lines normalize to nothing is one line, not a
    ZeroDivisionError."""
    run, _ = make_run(tmp_path, "mamba")
    one, two = tmp_path / "sep.txt", tmp_path / "space.txt"
    one.write_text("the cat sat\u2028on the mat .\n", encoding="utf-8")
    two.write_text("the cat sat on the mat .\n", encoding="utf-8")
    reports = []
    for path in (one, two):
        assert main(["evaluate", "--run-dir", str(run), "--text", str(path), "--lang", "en", "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out)["languages"]["en"]["model"])
    assert reports[0] == reports[1]

    blank = tmp_path / "zwnj.txt"
    blank.write_text("\u200c\u200c\n\u200b\n", encoding="utf-8")
    assert main(["evaluate", "--run-dir", str(run), "--text", str(blank), "--lang", "fa"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no line has any text left after normalization" in err and len(err.splitlines()) == 1


def test_ngram_sample_keeps_whole_lines_of_every_language():
    """A shard of fa, zh (long lines) and en lines one after the other, sampled to a tenth: whole lines only, the
    shard's first among them, every language in about its share of tokens; under the limit, the shard whole."""
    from sokhan.pipeline.stages.evaluate import ngram_sample

    rng = np.random.default_rng(0)
    eos, tags = 1, {"fa": 3, "zh": 4, "en": 5}
    lines, shard, tokens_of = [], [], {}
    for lang, n_lines, longest in (("fa", 12000, 30), ("zh", 1200, 300), ("en", 2000, 30)):
        for _ in range(n_lines):
            line = [tags[lang], *rng.integers(10, 300, rng.integers(1, longest)).tolist(), eos]
            lines.append(tuple(line))
            shard += line
        tokens_of[lang] = len(shard) - sum(tokens_of.values())
    shard = np.array(shard, dtype=np.uint16)
    assert np.array_equal(ngram_sample(shard, len(shard), eos), shard)
    limit = len(shard) // 10
    sample = ngram_sample(shard, limit, eos, stretches=32, min_stretch=32)  # stretches of ~1250 tokens: lines fit
    assert sample.dtype == np.int64 and 0.9 * limit < len(sample) < 1.1 * limit
    ends = np.flatnonzero(sample == eos)
    assert ends[-1] == len(sample) - 1
    got = [tuple(x) for x in np.split(sample, ends[:-1] + 1)]
    # Whole lines of the shard, the first among them, none taken more often than the shard has it.
    have, taken = Counter(lines), Counter(got)
    assert got[0] == lines[0] and all(have[line] >= k for line, k in taken.items())
    for lang, tag in tags.items():
        share = sum(len(line) for line in got if line[0] == tag) / len(sample)
        assert share == pytest.approx(tokens_of[lang] / len(shard), abs=0.05), lang


def test_ngram_sample_stays_near_its_limit_with_endless_lines():
    """A line longer than a stretch, or a shard with no line ends at all, is cut at the stretches' ends: the sample
    stays within a factor of two of the limit."""
    from sokhan.pipeline.stages.evaluate import ngram_sample

    eos = 1
    no_ends = np.full(100_000, 7, dtype=np.uint16)
    one_long = np.concatenate([[3], np.full(50_000, 7), [eos], np.tile([3, 8, 9, eos], 5000)]).astype(np.uint16)
    for shard in (no_ends, one_long):
        sample = ngram_sample(shard, 10_000, eos, stretches=8, min_stretch=100)
        assert 10_000 // 2 <= len(sample) <= 2 * 10_000


def test_a_large_training_shard_is_sampled_for_the_ngram(tmp_path, capsys):
    run, config = make_run(tmp_path, "mamba")
    config.evaluate.ngram_max_tokens = 150
    run_stage("evaluate", config, run)
    report = json.loads((run / "evaluate" / "report.json").read_text(encoding="utf-8"))
    n_train = (run / "tokenize" / "train.bin").stat().st_size // 2
    # One stretch (150 tokens are fewer than a stretch's minimum): the shard's start to the end of its 150th token's line.
    assert 150 <= report["ngram"]["counted_tokens"] < 180 and report["ngram"]["train_tokens"] == n_train
    assert f"on {report['ngram']['counted_tokens']:,} of the {n_train:,} tokens" in capsys.readouterr().err


@pytest.mark.parametrize("data, message", [(b"", "empty"), (b"abc", "3 bytes, not a whole number of uint16 tokens")])
def test_an_empty_or_damaged_training_shard_is_named(tmp_path, data, message):
    from sokhan import SokhanError
    from sokhan.pipeline.stages.evaluate import _train_tokens

    (tmp_path / "train.bin").write_bytes(data)
    with pytest.raises(SokhanError, match=message):
        _train_tokens(tmp_path, {"dtype": "uint16"})


def test_adhoc_text_says_when_the_model_never_saw_its_language_or_lang_disagrees(tmp_path, capsys):
    """A table alone read as a verdict: Chinese text on a Persian model came out "17% below the n-gram's" with both
    at 0% accuracy. The figures are still printed, with a line saying what they measure."""
    run, _ = make_run(tmp_path, "mamba")
    meta_path = run / "tokenize" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokens"] = {"train": {"fa": 100, "en": 0}, "val": {}}
    meta_path.write_text(json.dumps(meta))
    en, fa = tmp_path / "en.txt", tmp_path / "fa.txt"
    en.write_text("the cat sat on the mat .\n", encoding="utf-8")
    fa.write_text("در جنگل یک شیر درنده را دیدم\nکتاب را خواندم\n", encoding="utf-8")
    assert main(["evaluate", "--run-dir", str(run), "--text", str(en)]) == 0
    err = capsys.readouterr().err
    assert "this model was trained on fa text only; its en figures measure text it has not seen" in err
    assert main(["evaluate", "--run-dir", str(run), "--text", str(fa)]) == 0
    assert "not seen" not in capsys.readouterr().err
    assert main(["evaluate", "--run-dir", str(run), "--text", str(fa), "--lang", "en"]) == 0
    err = capsys.readouterr().err
    assert f"--lang en for {fa}, but most of its lines are in Arabic (Persian) script; they are scored as en" in err


def test_a_reader_that_leaves_does_not_cost_the_evaluation(tmp_path, monkeypatch):
    """`sokhan run … | true`: the table was printed before the stage was published, so the closed pipe threw the
    finished evaluation away (exit 0, nothing said) and put the previous config.json back."""
    import builtins

    run, config = make_run(tmp_path, "mamba")
    save_run_config(run, config)
    real_print = builtins.print

    def closed_pipe(*args, **kwargs):
        if kwargs.get("file") is None:  # stdout: the table
            raise BrokenPipeError(32, "Broken pipe")
        real_print(*args, **kwargs)

    monkeypatch.setattr(builtins, "print", closed_pipe)
    monkeypatch.setattr("os.dup2", lambda *a: None)  # main points stdout at /dev/null; not pytest's
    assert main(["evaluate", "--run-dir", str(run), "--set", "evaluate.nextword_words=3"]) == 0
    manifest = json.loads((run / "evaluate" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["evaluate"]["nextword_words"] == 3
    assert json.loads((run / "config.json").read_text(encoding="utf-8"))["evaluate"]["nextword_words"] == 3
