"""The train stage on a tiny run: it learns, writes its artefacts, groups weight decay, schedules the lr, stops on NaN."""

from __future__ import annotations

import contextlib
import json
import math
import random

import numpy as np
import pytest
import torch
from tiny_run import make_tiny_run, tiny_config

from sokhan import SokhanError
from sokhan.pipeline.models import ModelConfig, build
from sokhan.pipeline.stage import run_stage, upstream_digest
from sokhan.pipeline.train import checkpoint as ckpt
from sokhan.pipeline.train import loop
from sokhan.pipeline.train.data import Batches, open_shard, validation_batches
from sokhan.pipeline.train.optim import lr_at, param_groups


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A transformer trained for 150 steps (about 5 s on one core): the run directory and the train manifest."""
    run = make_tiny_run(tmp_path_factory.mktemp("run"))
    cfg = tiny_config("train.steps=150", "train.batch_size=8", "train.seq_len=32", "train.eval_every=50",
                      "train.ckpt_every=50", "train.warmup_steps=10")
    run_stage("embed", cfg, run)
    return run, cfg, run_stage("train", cfg, run)


def test_validation_loss_falls_well_below_the_unigram_baseline(trained):
    _, _, manifest = trained
    m = manifest["metrics"]
    # The Markov text has ~log 3 nats of word entropy; the unigram model pays ~log(25 words) plus subword costs.
    assert m["final_val_loss"] < 0.6 * m["unigram_val_loss"], m
    assert m["best_val_loss"] <= m["final_val_loss"]
    assert m["kernels"] in ("auto", "cpu", "reference", "triton")  # the backend asked for (SOKHAN_KERNELS)


def test_train_writes_model_config_metrics_plot_and_checkpoints(trained):
    run, cfg, manifest = trained
    out = run / "train"
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "loss.png", "manifest.json"):
        assert (out / name).is_file(), name
    steps = [s for s, _ in ckpt.checkpoints(out / "checkpoints")]
    assert steps == [100, 150]  # keep_last = 2
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()
    assert not [p for p in out.rglob(".*tmp*")]  # no temporary leftovers

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 151))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in records)
    assert [r["step"] for r in records if "val_loss" in r] == [50, 100, 150]

    stored = json.loads((out / "config.json").read_text())
    assert stored["model"]["vocab_size"] == json.loads((run / "tokenize" / "meta.json").read_text())["vocab_size"]
    assert stored["model"]["d_model"] == 32 and stored["train"]["steps"] == 150


def test_load_model_gives_back_the_final_weights(trained):
    run, _, manifest = trained
    model, mcfg = ckpt.load_model(run / "train")
    assert mcfg.arch == "transformer" and not model.training
    last, _ = ckpt.read_tensors(run / "train" / "checkpoints" / "step_000150" / "model.safetensors")
    for name, p in model.state_dict().items():
        if name in last:
            assert torch.equal(p, last[name]), name
    # Validation loss recomputed from the loaded model matches the logged one (same batches, float32 on CPU).
    meta = json.loads((run / "tokenize" / "meta.json").read_text())
    val = open_shard(run / "tokenize" / "val.bin", meta["dtype"], 33)
    batches = validation_batches(val, 8, 32, 2, 0 + loop.VALIDATION_SEED_OFFSET)
    got = loop.evaluate(model, batches, torch.device("cpu"), loop._autocast(torch.device("cpu")))
    assert got == pytest.approx(manifest["metrics"]["final_val_loss"], rel=1e-6)


def test_training_again_gives_the_same_bytes(trained, tmp_path):
    """Weights, and checkpoints too: their trainer state saved Python's and numpy's unseeded generators."""
    import shutil

    run, cfg, manifest = trained
    again = tmp_path / "again"
    shutil.copytree(run, again, ignore=shutil.ignore_patterns("train", "train.partial"))
    random.seed(1234)  # as another process would start them
    np.random.seed(1234)
    second = run_stage("train", cfg, again)
    timings = {"metrics.jsonl", "loss.png"}  # wall-clock step times
    assert {k: v for k, v in second["outputs"].items() if k not in timings} == {
        k: v for k, v in manifest["outputs"].items() if k not in timings}
    # What export and evaluate record of training leaves those two out: they stay up to date.
    assert set(second["reports"]) == timings
    assert upstream_digest(second) == upstream_digest(manifest)


def test_validation_builds_no_graph(monkeypatch):
    """Validation ran with gradients on once (a decorator moved to another function): the same loss, but the loss
    kernel formed every gradient in its forward pass, and evaluation took twice as long."""
    model = build(ModelConfig(arch="transformer", d_model=16, n_layers=1, n_heads=2, vocab_size=50, max_seq_len=16))
    seen = []
    real = loop.lm_loss

    def recording(*args):
        seen.append(torch.is_grad_enabled())
        return real(*args)

    monkeypatch.setattr(loop, "lm_loss", recording)
    batch = torch.randint(0, 50, (2, 9))
    loop.evaluate(model, [(batch[:, :-1], batch[:, 1:])], torch.device("cpu"), contextlib.nullcontext)
    assert seen == [False] and model.training  # and back in training mode after


def test_mamba_trains_through_the_same_stage(tmp_path):
    run = make_tiny_run(tmp_path)
    cfg = tiny_config("model.arch=mamba", "model.n_layers=1", "train.steps=40", "train.batch_size=8",
                      "train.seq_len=32", "train.eval_every=20", "train.ckpt_every=20", "train.warmup_steps=5")
    run_stage("embed", cfg, run)
    m = run_stage("train", cfg, run)["metrics"]
    assert m["arch"] == "mamba"
    assert m["final_val_loss"] < m["unigram_val_loss"], m
    model, mcfg = ckpt.load_model(run / "train")
    emb = ckpt.read_tensors(run / "embed" / "embeddings.safetensors")[0]["embeddings"]
    assert mcfg.arch == "mamba" and model.get_input_embeddings().weight.shape == emb.shape


@pytest.mark.parametrize("arch", ["transformer", "mamba"])
def test_weight_decay_skips_norms_biases_embeddings_a_log_and_d(arch):
    cfg = tiny_config(f"model.arch={arch}").model.resolve(50)
    model = build(cfg)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed and kept and not decayed & kept
    assert len(decayed) + len(kept) == len(list(model.parameters()))
    for n in kept:
        p = dict(model.named_parameters())[n]
        assert p.ndim < 2 or "embeddings" in n or n.endswith(("A_log", "D")), n
    for n in decayed:
        assert "norm" not in n and "embeddings" not in n and not n.endswith(("bias", "A_log", ".D")), n
    if arch == "mamba":
        assert any(n.endswith("mixer.A_log") for n in kept) and any(n.endswith("mixer.D") for n in kept)
        assert any(n.endswith("mixer.in_proj.weight") for n in decayed)


@pytest.mark.parametrize("tie", [True, False])
def test_embedding_weight_decay_puts_the_table_in_a_group_of_its_own(tie):
    model = build(tiny_config("model.arch=transformer", f"model.tie_embeddings={str(tie).lower()}").model.resolve(50))
    table = model.get_input_embeddings().weight
    decay, no_decay, embeddings = param_groups(model, 0.1, embedding_weight_decay=0.05)
    assert embeddings["weight_decay"] == 0.05 and [id(p) for p in embeddings["params"]] == [id(table)]
    assert all(p is not table for p in decay["params"] + no_decay["params"])
    # An untied output projection is a weight matrix like the others; a tied one is the table itself.
    assert any(p is model.lm_head.weight for p in decay["params"]) == (not tie)
    assert len(param_groups(model, 0.1)) == 2  # 0: the table stays with the parameters that do not decay


def test_embedding_weight_decay_is_checked_by_name():
    with pytest.raises(SokhanError, match=r"train.embedding_weight_decay = -0.1 must be ≥ 0"):
        tiny_config("train.embedding_weight_decay=-0.1")


def test_lr_schedule_warms_up_then_follows_a_cosine_to_min_lr():
    lrs = [lr_at(s, 1.0, 0.1, 10, 111) for s in range(111)]  # 100 decay steps after warmup
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # midpoint of the decay


def test_batches_are_shifted_windows_and_resume_from_their_state(tmp_path):
    shard = np.arange(1000, dtype=np.uint16)
    b = Batches(shard, batch_size=3, seq_len=8, seed=5)
    x, y = b.next()
    assert x.shape == y.shape == (3, 8) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(3, 7, dtype=torch.int64))
    state = b.state()
    after = [b.next() for _ in range(3)]
    c = Batches(shard, batch_size=3, seq_len=8, seed=999)
    c.load_state(json.loads(json.dumps(state)))
    assert all(torch.equal(a[0], r[0]) for a, r in zip(after, [c.next() for _ in range(3)]))
    assert c.drawn == b.drawn == 4


def test_data_parallel_ranks_split_the_single_process_batch():
    shard = np.arange(5000, dtype=np.uint16)
    whole = Batches(shard, batch_size=4, seq_len=6, seed=1)
    ranks = [Batches(shard, batch_size=2, seq_len=6, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, _ = whole.next()
        parts = [r.next()[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x)


def test_short_shard_and_bad_dtype_are_one_line_errors(tmp_path):
    p = tmp_path / "train.bin"
    np.arange(10, dtype=np.uint16).tofile(p)
    with pytest.raises(SokhanError, match=r"train.bin: 10 tokens, fewer than .* 33"):
        open_shard(p, "uint16", 33)
    p.write_bytes(b"\x00" * 7)
    with pytest.raises(SokhanError, match="not a whole number of uint16 tokens"):
        open_shard(p, "uint16", 2)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = make_tiny_run(tmp_path)
    cfg = tiny_config("train.steps=8", "train.ckpt_every=2", "train.eval_every=100")  # every lm_loss call is a step
    run_stage("embed", cfg, run)
    calls = {"n": 0}
    real = loop.lm_loss

    def poisoned(model, x, y):
        calls["n"] += 1
        loss = real(model, x, y)
        return loss * float("nan") if calls["n"] == 5 else loss  # the 5th step's loss

    monkeypatch.setattr(loop, "lm_loss", poisoned)
    with pytest.raises(SokhanError, match=r"loss is nan at step 5; stopped \(the last good checkpoint is .*step_000004\)"):
        run_stage("train", cfg, run)
    assert not (run / "train").exists()  # nothing published
    good = run / "train.partial" / "checkpoints" / "step_000004"
    model, _ = ckpt.load_model(good)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [s for s, _ in ckpt.checkpoints(run / "train.partial" / "checkpoints")] == [2, 4]


def test_nan_validation_loss_stops_the_run_too(tmp_path, monkeypatch):
    """A finite training loss but a NaN on the held-out batches was written into metrics.jsonl as a bare NaN (not
    JSON) and the run went on."""
    run = make_tiny_run(tmp_path)
    cfg = tiny_config("train.steps=8", "train.ckpt_every=2", "train.eval_every=4")
    run_stage("embed", cfg, run)
    monkeypatch.setattr(loop, "evaluate", lambda *args: float("nan"))
    with pytest.raises(SokhanError, match=r"validation loss is nan at step 4; stopped \(the last good checkpoint is .*step_000002\)"):
        run_stage("train", cfg, run)
    for line in (run / "train.partial" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_embedding_table_of_the_wrong_shape_is_refused(tmp_path):
    run = make_tiny_run(tmp_path)
    run_stage("embed", tiny_config("model.d_model=16", "model.n_heads=2"), run)
    # The embed manifest is for d_model 16; train with 32 reads a table that does not fit.
    cfg = tiny_config()
    with pytest.raises(SokhanError, match=r"embeddings.safetensors: embeddings have shape \(\d+, 16\), the model needs"):
        loop.load_embeddings(build(cfg.model.resolve(json.loads((run / "tokenize" / "meta.json").read_text())["vocab_size"])),
                             run / "embed" / "embeddings.safetensors")


def test_token_ids_beyond_the_vocabulary_and_too_long_windows_are_refused(tmp_path):
    run = make_tiny_run(tmp_path)
    run_stage("embed", tiny_config(), run)
    np.full(500, 60000, dtype=np.uint16).tofile(run / "tokenize" / "train.bin")
    with pytest.raises(SokhanError, match=r"token id 60000 in the shards is outside the vocabulary"):
        run_stage("train", tiny_config(), run)
    other = make_tiny_run(tmp_path / "other")
    run_stage("embed", tiny_config(), other)
    with pytest.raises(SokhanError, match=r"train.seq_len = 128 exceeds model.max_seq_len = 64"):
        run_stage("train", tiny_config("train.seq_len=128"), other)


def test_publish_best_publishes_the_best_validation_weights(tmp_path):
    run = make_tiny_run(tmp_path)
    # A constant, too-high lr: validation is best at step 4 and worse at the end, so best and final differ.
    cfg = tiny_config("train.publish=best", "train.steps=6", "train.eval_every=2", "train.lr=0.1", "train.min_lr=0.1",
                      "train.warmup_steps=0")
    run_stage("embed", cfg, run)
    m = run_stage("train", cfg, run)["metrics"]
    info = json.loads((run / "train" / "checkpoints" / "best" / "info.json").read_text())
    assert m["published"] == "best" and info["step"] == m["best_step"] and info["val_loss"] == m["best_val_loss"]
    assert m["best_step"] < 6 and m["best_val_loss"] < m["final_val_loss"]
    assert (run / "train" / "model.safetensors").read_bytes() == (run / "train" / "checkpoints" / "best" / "model.safetensors").read_bytes()


def test_warmup_longer_than_the_run_is_announced(tmp_path, capsys):
    run = make_tiny_run(tmp_path / "run")
    cfg = tiny_config("train.steps=4", "train.warmup_steps=8", "train.eval_every=4", "train.ckpt_every=4")
    run_stage("embed", cfg, run)
    run_stage("train", cfg, run)
    assert ("train.warmup_steps = 8 leaves train.steps = 4 no room for the cosine decay: the learning rate is still "
            "warming up when training ends (it peaks at 0.005), never train.min_lr = 0.001") in capsys.readouterr().err
    # Warmup up to the last step but one: the peak, then no decay ("peaks at 0.01, not 0.01" said the old notice).
    for warmup in (3, 4):
        other = make_tiny_run(tmp_path / f"run{warmup}")
        cfg = tiny_config("train.steps=4", f"train.warmup_steps={warmup}", "train.eval_every=4", "train.ckpt_every=4")
        run_stage("embed", cfg, other)
        run_stage("train", cfg, other)
        assert (f"train.warmup_steps = {warmup} leaves train.steps = 4 no room for the cosine decay: the learning rate "
                "reaches train.lr = 0.01 and ends there") in capsys.readouterr().err
    assert lr_at(3, 0.01, 0.001, 3, 4) == pytest.approx(0.01) and lr_at(3, 0.01, 0.001, 2, 4) == pytest.approx(0.001)
    one = make_tiny_run(tmp_path / "one")  # one step, warmup 8: said too (at 1/8 of train.lr)
    cfg = tiny_config("train.steps=1", "train.warmup_steps=8", "train.eval_every=1", "train.ckpt_every=1")
    run_stage("embed", cfg, one)
    run_stage("train", cfg, one)
    assert "learning rate is still warming up when training ends (it peaks at 0.00125)" in capsys.readouterr().err


def test_unigram_val_loss_counts_in_chunks(monkeypatch):
    """The add-one unigram bar, counted a chunk at a time, against the direct float64 formula."""
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 50, 1000).astype(np.uint16), rng.integers(0, 60, 300).astype(np.uint16)
    counts = np.bincount(train.astype(np.int64), minlength=64) + 1.0
    want = -np.log(counts / counts.sum())[val.astype(np.int64)].mean()
    monkeypatch.setattr(loop, "_COUNT_CHUNK", 7)  # many chunks, the last one short
    assert loop.unigram_val_loss(train, val, 64) == pytest.approx(want, rel=1e-12)


def test_a_held_out_shard_too_short_for_one_window_names_val_fraction(tmp_path):
    run = make_tiny_run(tmp_path, val_lines=2)
    meta = json.loads((run / "tokenize" / "meta.json").read_text())
    n_val = (run / "tokenize" / "val.bin").stat().st_size // np.dtype(meta["dtype"]).itemsize
    cfg = tiny_config(f"train.seq_len={n_val}", "train.steps=1")
    run_stage("embed", cfg, run)
    with pytest.raises(SokhanError, match=rf"val.bin: {n_val} tokens, .* raise tokenize.val_fraction"):
        run_stage("train", cfg, run)


EVAL_LINE = r"\[sokhan\] train: step (\d+)/10  loss \d+\.\d{3}  val \d+\.\d{3}  [\d.e+-]+ m?s/step  eta \d+(s|m|h\d\dm)$"


def test_without_a_progress_bar_each_evaluation_is_logged(tmp_path, capsys):
    """stderr to a log file: no bar, and a 30-minute run used to say nothing between 'running' and 'done'."""
    import re

    run = make_tiny_run(tmp_path)
    cfg = tiny_config("train.steps=10", "train.eval_every=3", "train.ckpt_every=5")
    run_stage("embed", cfg, run)
    capsys.readouterr()
    run_stage("train", cfg, run)  # captured stderr is no terminal (and SOKHAN_PROGRESS=0): the bar is off
    lines = [m for line in capsys.readouterr().err.splitlines() if (m := re.match(EVAL_LINE, line))]
    assert [int(m.group(1)) for m in lines] == [3, 6, 9, 10]


def test_with_a_progress_bar_evaluations_go_to_the_bar_not_to_lines(tmp_path, capsys, monkeypatch):
    from tqdm.auto import tqdm

    bars = []

    def shown(**kwargs):  # as on a terminal
        bars.append(tqdm(disable=False, **kwargs))
        return bars[-1]

    monkeypatch.setattr(loop, "progress", shown)
    run = make_tiny_run(tmp_path)
    cfg = tiny_config("train.steps=10", "train.eval_every=3", "train.ckpt_every=5")
    run_stage("embed", cfg, run)
    capsys.readouterr()
    run_stage("train", cfg, run)
    assert "train: step" not in capsys.readouterr().err
    assert bars[0].postfix.startswith("loss=") and "val=" in bars[0].postfix


def test_eta_reads_in_seconds_minutes_or_hours():
    seconds = (0.4, 42, 59.6, 35 * 60 + 10, 2 * 3600 + 5 * 60)
    assert [loop._duration(s) for s in seconds] == ["0s", "42s", "1m", "35m", "2h05m"]


def test_a_full_disk_under_a_checkpoint_write_names_what_the_run_keeps(tmp_path):
    """safetensors reports a full disk as its own error, not an OSError: the checkpoint's one line missed it."""
    with pytest.raises(SokhanError, match=r"^train: cannot write .*step_000003 \(No space left on device \(os error 28\)\); "
                                          r"no checkpoint was written before it$"):
        with loop._writing(tmp_path / "checkpoints" / "step_000003", tmp_path / "checkpoints"):
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(ValueError):  # a bug is not a full disk
        with loop._writing(tmp_path / "x", tmp_path / "checkpoints"):
            raise ValueError("a bug")
