"""A killed training run resumed from its last checkpoint repeats the uninterrupted run bit for bit on CPU."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_run import ONE_THREAD_ENV, make_tiny_run, tiny_config

from sokhan import SokhanError
from sokhan.pipeline.stage import run_stage, save_run_config
from sokhan.pipeline.train import checkpoint as ckpt


def _records(train_dir):
    return [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a, b):
    """Same per-step losses, grad norms and validation losses, and identical final and best weights."""
    ra, rb = _records(a), _records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert (x["loss"], x["grad_norm"], x["lr"], x.get("val_loss")) == (y["loss"], y["grad_norm"], y["lr"], y.get("val_loss")), x["step"]
    for name in ("model.safetensors", "checkpoints/best/model.safetensors"):
        ta, tb = ckpt.read_tensors(a / name)[0], ckpt.read_tensors(b / name)[0]
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny run directory with its embed stage done, to copy per test."""
    run = make_tiny_run(tmp_path_factory.mktemp("base"))
    run_stage("embed", tiny_config(), run)
    return run


def _interrupt_after_checkpoint(run, cfg, step, monkeypatch):
    """Train ``run`` until checkpoint ``step`` is on disk, then stop there as Ctrl-C would."""
    real = ckpt.save_checkpoint

    def save_then_die(root, at, *args, **kwargs):
        out = real(root, at, *args, **kwargs)
        if at == step:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage("train", cfg, run)
    monkeypatch.setattr(ckpt, "save_checkpoint", real)


def _copy(base, dest):
    shutil.copytree(base, dest)
    return dest


@pytest.mark.parametrize("arch", ["transformer", "mamba"])
def test_interrupted_after_a_checkpoint_resumes_exactly(base, tmp_path, monkeypatch, arch):
    # Dropout on: the resumed run must also restore the global torch RNG that draws its masks.
    cfg = tiny_config(f"model.arch={arch}", "model.dropout=0.1", "train.steps=10", "train.ckpt_every=2", "train.eval_every=3")
    whole = run_stage("train", cfg, _copy(base, tmp_path / "whole"))

    run = _copy(base, tmp_path / "killed")
    _interrupt_after_checkpoint(run, cfg, 4, monkeypatch)  # as if killed right after checkpoint 4 reached the disk
    assert not (run / "train").exists() and (run / "train.partial" / "checkpoints" / "step_000004").is_dir()

    resumed = run_stage("train", cfg, run)
    assert resumed["metrics"]["resumed_from_step"] == 4 and whole["metrics"]["resumed_from_step"] == 0
    _assert_same_run(tmp_path / "whole" / "train", run / "train")


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_exactly_with_resume_flag(base, tmp_path):
    overrides = ["train.steps=300", "train.ckpt_every=20", "train.keep_last=50", "train.eval_every=50"]
    cfg = tiny_config(*overrides)
    run_stage("train", cfg, _copy(base, tmp_path / "whole"))

    run = _copy(base, tmp_path / "killed")
    save_run_config(run, cfg)
    env = {**os.environ, **ONE_THREAD_ENV}
    cmd = [sys.executable, "-m", "sokhan", "train", "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = run / "train.partial" / "checkpoints" / "step_000040"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), proc.stderr.read().decode()
    assert not (run / "train").exists(), "the run finished before it was killed; make it longer"
    steps_done = max(s for s, _ in ckpt.checkpoints(run / "train.partial" / "checkpoints"))
    assert steps_done < 300

    # --resume with a changed setting used to delete the checkpoints, then say there were none to resume from; and
    # the rejected --set stayed in config.json for the next command.
    config_before = (run / "config.json").read_bytes()
    refused = subprocess.run([*cmd, "--resume", "--set", "train.steps=310"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2
    assert "cannot be resumed (changed since: train.steps: 300 → 310); nothing was deleted" in refused.stderr
    assert max(s for s, _ in ckpt.checkpoints(run / "train.partial" / "checkpoints")) == steps_done
    assert (run / "config.json").read_bytes() == config_before

    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {run / 'train.partial' / 'checkpoints' / f'step_{steps_done:06d}'}" in done.stderr
    _assert_same_run(tmp_path / "whole" / "train", run / "train")


def test_resume_flag_without_an_interrupted_run_is_an_error(base, tmp_path):
    run = _copy(base, tmp_path / "fresh")
    import argparse

    with pytest.raises(SokhanError, match="--resume: no checkpoint of an interrupted run"):
        run_stage("train", tiny_config(), run, args=argparse.Namespace(resume=True))
    assert not (run / "train.partial").exists()  # it left a folder holding only the fingerprint


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(base, tmp_path, monkeypatch, capsys):
    """Checkpoint 6 cut short on disk: the run resumes from 4, warns once naming 6, and still ends bit for bit
    where the uninterrupted run does. With every checkpoint damaged it says so in one line."""
    cfg = tiny_config("train.steps=10", "train.ckpt_every=2", "train.eval_every=3")
    run_stage("train", cfg, _copy(base, tmp_path / "whole"))

    run = _copy(base, tmp_path / "killed")
    _interrupt_after_checkpoint(run, cfg, 6, monkeypatch)
    root = run / "train.partial" / "checkpoints"
    weights = ckpt.step_dir(root, 6) / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    keep = tmp_path / "copy-before-resume"
    shutil.copytree(run, keep)

    resumed = run_stage("train", cfg, run)
    assert resumed["metrics"]["resumed_from_step"] == 4
    err = capsys.readouterr().err
    assert err.count("cannot resume from") == 1 and "step_000006" in err
    _assert_same_run(tmp_path / "whole" / "train", run / "train")

    for _, folder in ckpt.checkpoints(keep / "train.partial" / "checkpoints"):
        (folder / ckpt.MODEL_FILE).write_bytes(b"")
    with pytest.raises(SokhanError, match="no readable checkpoint to resume from .*--force"):
        run_stage("train", cfg, keep)


def test_a_run_that_fails_before_its_first_checkpoint_keeps_the_previous_config(base, tmp_path, capsys):
    """Diverging at step 2, before any checkpoint: there is nothing to resume, so the rejected settings must not stay
    in config.json for the next command (they did: a stamp in train.partial counted as work)."""
    from sokhan.pipeline.cli import main

    run = _copy(base, tmp_path / "nan")
    save_run_config(run, tiny_config())
    before = (run / "config.json").read_bytes()
    assert main(["train", "--run-dir", str(run), "--set", "train.lr=1e6", "--set", "train.min_lr=1",
                 "--set", "train.warmup_steps=0", "--set", "train.ckpt_every=5"]) != 0
    assert "nan" in capsys.readouterr().err.lower()
    assert (run / "config.json").read_bytes() == before


def test_resuming_with_another_process_count_says_it_will_not_repeat(base, tmp_path, monkeypatch, capsys):
    run = _copy(base, tmp_path / "ws")
    cfg = tiny_config("train.steps=10", "train.ckpt_every=2", "train.eval_every=5")
    _interrupt_after_checkpoint(run, cfg, 4, monkeypatch)
    state_file = run / "train.partial" / "checkpoints" / "step_000004" / ckpt.STATE_JSON
    state = json.loads(state_file.read_text())
    assert state["world_size"] == 1
    state_file.write_text(json.dumps(dict(state, world_size=2)))  # as if it had run under torchrun with 2
    capsys.readouterr()
    run_stage("train", cfg, run)
    assert "the interrupted run had 2 process(es), this one has 1" in capsys.readouterr().err


def test_a_resumed_run_does_not_publish_an_earlier_process_s_temporaries(base, tmp_path, monkeypatch):
    """A process that died writing left .step_000020.tmp16023/ and .best.tmp16023/; the resumed run (another pid)
    published them in RUN/train/checkpoints and listed them in the manifest."""
    cfg = tiny_config("train.steps=6", "train.ckpt_every=2", "train.eval_every=3")
    run = _copy(base, tmp_path / "killed")
    _interrupt_after_checkpoint(run, cfg, 4, monkeypatch)
    partial = run / "train.partial"
    for dead in (".step_000006.tmp1", ".best.tmp1"):
        (partial / "checkpoints" / dead).mkdir()
        (partial / "checkpoints" / dead / ckpt.MODEL_FILE).write_bytes(b"half a file")
    (partial / ".metrics.jsonl.tmp1").write_text("half a file")

    manifest = run_stage("train", cfg, run)
    assert manifest["metrics"]["resumed_from_step"] == 4
    assert not [p for p in (run / "train").rglob("*") if ".tmp" in p.name]
    listed = json.loads((run / "train" / "manifest.json").read_text())["outputs"]
    assert not [name for name in listed if ".tmp" in name]


def _full_disk_for(name, monkeypatch):
    """Every file whose name holds ``name`` opened for writing gets half of what is written to it, then ENOSPC."""
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and name in os.fspath(file) and "w" in mode:
            real_write = f.write

            def write(data):
                real_write(data[: len(data) // 2])
                f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            f.write = write
        return f

    monkeypatch.setattr(builtins, "open", failing_open)
    monkeypatch.setattr(io, "open", failing_open)  # pathlib opens through io.open


def test_a_failed_rewrite_of_the_metrics_on_resume_loses_no_records(base, tmp_path, monkeypatch):
    """Resuming rewrites metrics.jsonl up to the checkpoint's step; rewritten in place, a full disk cut it short and
    the published file began at step 11."""
    cfg = tiny_config("train.steps=10", "train.ckpt_every=2", "train.eval_every=3")
    run_stage("train", cfg, _copy(base, tmp_path / "whole"))
    run = _copy(base, tmp_path / "killed")
    _interrupt_after_checkpoint(run, cfg, 4, monkeypatch)
    metrics = run / "train.partial" / "metrics.jsonl"
    before = metrics.read_bytes()
    assert [r["step"] for r in _records(run / "train.partial")] == [1, 2, 3, 4]

    with monkeypatch.context() as m:
        _full_disk_for("metrics.jsonl", m)
        with pytest.raises(OSError, match="No space left"):
            run_stage("train", cfg, run)
    assert metrics.read_bytes() == before
    run_stage("train", cfg, run)
    _assert_same_run(tmp_path / "whole" / "train", run / "train")


def test_finished_training_that_could_not_be_published_resumes_with_its_figures(base, tmp_path, monkeypatch):
    """A full disk when the manifest was written: the finished run is resumed (nothing left to train) and published
    with the final losses of its last recorded step, not nulls."""
    from sokhan.pipeline import stage as stage_mod

    run = _copy(base, tmp_path / "run")
    cfg = tiny_config("train.steps=6", "train.ckpt_every=3", "train.eval_every=3")
    real = stage_mod.write_json

    def full_once(path, obj):
        if path.name == "manifest.json" and path.parent.name == "train.partial" and not full_once.done:
            full_once.done = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, obj)

    full_once.done = False
    monkeypatch.setattr(stage_mod, "write_json", full_once)
    with pytest.raises(OSError):
        run_stage("train", cfg, run)
    assert (run / "train.partial" / ".fingerprint").exists()
    manifest = run_stage("train", cfg, run)
    m = manifest["metrics"]
    assert m["resumed_from_step"] == 6
    last = _records(run / "train")[-1]
    assert m["final_loss"] == last["loss"] and m["final_val_loss"] == last["val_loss"]


def test_a_best_checkpoint_newer_than_the_resumed_one_keeps_its_figures(base, tmp_path, monkeypatch):
    """Killed after `best` was written at step 6 but before checkpoint 8: the resumed run took best_step and its loss
    from checkpoint 4 while publish = "best" published step 6's weights. Where the resumed steps do not repeat the
    killed ones (a GPU, another process count; here: validation made worse by hand), the two disagreed."""
    from sokhan.pipeline.train import loop

    cfg = tiny_config("train.steps=8", "train.ckpt_every=4", "train.eval_every=2", "train.publish=best")
    run = _copy(base, tmp_path / "killed")
    real = ckpt.save_model_folder

    def save_then_die(folder, model, config, extra=None):
        real(folder, model, config, extra)
        if extra and extra.get("step") == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_model_folder", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage("train", cfg, run)
    monkeypatch.setattr(ckpt, "save_model_folder", real)
    best = json.loads((run / "train.partial" / "checkpoints" / "best" / "info.json").read_text())
    assert best["step"] == 6

    worse = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *args: worse(*args) + 1.0)  # the resumed steps do not repeat
    m = run_stage("train", cfg, run)["metrics"]
    assert (m["best_step"], m["best_val_loss"]) == (6, best["val_loss"])
    published = run / "train" / "model.safetensors"
    assert published.read_bytes() == (run / "train" / "checkpoints" / "best" / "model.safetensors").read_bytes()
