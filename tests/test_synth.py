"""`sokhan synth`: the data generators exactly, and a miniature training run of each architecture."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sokhan import SokhanError
from sokhan.pipeline import synth
from sokhan.pipeline.cli import main


def test_selective_copying_answer_is_in_the_input():
    x, y = synth.selective_copying(np.random.default_rng(0), batch=64, seq_len=20, n_data=5, n_symbols=6)
    assert x.shape == y.shape == (64, 25)
    assert (x[:, 20:] == 1).all()  # the markers
    assert (y[:, :20] == synth.IGNORE).all()
    region = x[:, :20]
    assert ((region == 0) | (region >= 2)).all() and region.max() <= 7
    for row, want in zip(region, y[:, 20:]):
        np.testing.assert_array_equal(row[row >= 2], want)  # the symbols, in order, are the answer
    # The symbols sit at different places in different examples: what a time-invariant model cannot track.
    assert len({tuple(np.flatnonzero(r)) for r in region}) > 50


def test_induction_heads_answer_follows_the_first_trigger():
    x, y = synth.induction_heads(np.random.default_rng(1), batch=64, seq_len=30, n_symbols=8)
    assert x.shape == y.shape == (64, 30)
    assert (y[:, :-1] == synth.IGNORE).all()
    for row, target in zip(x, y[:, -1]):
        triggers = np.flatnonzero(row == 0)
        assert len(triggers) == 2 and triggers[1] == 29 and triggers[0] < 28
        assert target == row[triggers[0] + 1] and 1 <= target <= 8


def test_seeds_reproduce():
    a = synth.selective_copying(np.random.default_rng(7), 8, 16, 4, 8)
    b = synth.selective_copying(np.random.default_rng(7), 8, 16, 4, 8)
    c = synth.selective_copying(np.random.default_rng(8), 8, 16, 4, 8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    d = synth.induction_heads(np.random.default_rng(7), 8, 16, 8)
    e = synth.induction_heads(np.random.default_rng(7), 8, 16, 8)
    np.testing.assert_array_equal(d[0], e[0])


def test_transformer_learns_a_tiny_copy():
    """One symbol to copy out of eight positions: a 2-layer transformer learns it in a few hundred cheap steps."""
    cfg = synth.SynthConfig(seq_len=8, n_data=1, n_symbols=4, test_lengths=[8], d_model=32, steps=150, batch_size=32,
                            eval_examples=128)
    row = synth.train_one("selective_copying", "transformer", cfg)
    assert row["accuracy"] > 0.9 and row["final_loss"] < 0.5


def test_cli_miniature_run(tmp_path, capsys):
    out = tmp_path / "synth"
    argv = ["synth", "--out", str(out), "--steps", "2", "--seq-len", "8", "--n-data", "2", "--n-symbols", "4",
            "--induction-len", "8", "--test-lengths", "8,16", "--d-model", "8", "--batch-size", "4", "--eval-examples", "8"]
    assert main(argv) == 0
    report = json.loads((out / "synth.json").read_text())
    rows = {(r["task"], r["arch"]) for r in report["results"]}
    assert rows == {(t, a) for t in synth.TASKS for a in synth.ARCHS}
    for r in report["results"]:
        acc = r["accuracy"] if r["task"] == "selective_copying" else r["accuracy"]["16"]
        assert 0.0 <= acc <= 1.0
    md = (out / "synth.md").read_text()
    assert "| mamba-lti |" in md and "L=16" in md
    assert "Induction heads" in capsys.readouterr().out


def test_bad_flags():
    with pytest.raises(SokhanError, match="n-data"):
        synth.SynthConfig(seq_len=4, n_data=4)
    assert main(["synth", "--arch", "rnn", "--steps", "1"]) == 2


@pytest.mark.parametrize("flags,message", [
    (["--lr", "-1"], "synth: lr = -1.0 must be a finite number > 0"),
    (["--lr", "nan"], "synth: lr = nan must be a finite number > 0"),
])
def test_bad_learning_rate_is_one_line(flags, message, capsys):
    assert main(["synth", "--steps", "1", *flags]) == 2
    assert message in capsys.readouterr().err


def test_out_that_is_a_file_fails_before_training(tmp_path, capsys):
    """The folder was made after all the training: a 20-minute run ended in a FileExistsError."""
    (tmp_path / "f").write_text("x")
    assert main(["synth", "--steps", "100000", "--out", str(tmp_path / "f")]) == 2
    assert f"--out {tmp_path / 'f'}: is a file, not a folder" in capsys.readouterr().err


def test_a_long_training_logs_a_bounded_number_of_lines(capsys):
    """A line every 50 steps gave --steps 100000 two thousand lines; now every tenth of the run and the last step."""
    import torch

    cfg = synth.SynthConfig(seq_len=8, n_data=1, n_symbols=4, steps=2005, batch_size=2, eval_examples=4)
    vocab = synth._vocab("selective_copying", cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as train_one does: 10x faster for a model this small
    try:
        synth._train("selective_copying", "mamba", cfg, torch.nn.Embedding(vocab, vocab))  # a cheap stand-in model
    finally:
        torch.set_num_threads(threads)
    steps = [line.split(" step ")[1].split()[0] for line in capsys.readouterr().err.splitlines() if " step " in line]
    assert steps == [f"{n}/2005" for n in (201, 402, 603, 804, 1005, 1206, 1407, 1608, 1809, 2005)]
