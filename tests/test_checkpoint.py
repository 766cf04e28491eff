"""Checkpoints: round trips of weights (tied once), optimizer and RNG; pruning; one-line errors for bad files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from tiny_run import tiny_config

from sokhan import SokhanError
from sokhan.pipeline.models import build
from sokhan.pipeline.train import checkpoint as ckpt
from sokhan.pipeline.train.loop import resolved_run_config
from sokhan.pipeline.train.optim import build_optimizer


def _model(arch: str = "transformer", **over):
    config = tiny_config(f"model.arch={arch}", *(f"model.{k}={v}" for k, v in over.items()))
    mcfg = config.model.resolve(40)
    torch.manual_seed(0)
    return build(mcfg), resolved_run_config(config, mcfg)


def _saved(tmp_path, arch="transformer"):
    model, run_config = _model(arch)
    ckpt.save_model_folder(tmp_path / "m", model, run_config)
    return model, tmp_path / "m"


@pytest.mark.parametrize("arch", ["transformer", "mamba"])
def test_load_model_round_trip_keeps_weights_and_outputs(tmp_path, arch):
    model, folder = _saved(tmp_path, arch)
    loaded, cfg = ckpt.load_model(folder)
    assert cfg.arch == arch and cfg.vocab_size == 40
    ids = torch.randint(0, 40, (2, 7))
    model.eval()
    assert torch.equal(loaded(ids), model(ids))
    # Tied output projection: stored once, still shared after loading.
    if cfg.tie_embeddings:
        assert loaded.get_input_embeddings().weight.data_ptr() == loaded.lm_head.weight.data_ptr()


def test_tied_weights_are_stored_once(tmp_path):
    _, folder = _saved(tmp_path)
    tensors, meta = ckpt.read_tensors(folder / "model.safetensors")
    assert "lm_head.weight" not in tensors and "embeddings.weight" in tensors
    assert json.loads(meta[ckpt.TIED_KEY]) == {"lm_head.weight": "embeddings.weight"}


def test_truncated_safetensors_is_one_line_naming_the_file(tmp_path):
    _, folder = _saved(tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(SokhanError) as e:
        ckpt.load_model(folder)
    msg = str(e.value)
    assert msg.startswith(str(f)) and "truncated or corrupt" in msg and "\n" not in msg
    assert "--force" not in msg  # not a finished stage's folder: nothing to rerun
    (folder / "manifest.json").write_text("{}")  # as RUN/train is once the stage has finished
    with pytest.raises(SokhanError, match=rf"`sokhan {folder.name} --run-dir {folder.parent} --force` makes it again"):
        ckpt.load_model(folder)


def test_garbage_file_is_one_line(tmp_path):
    _, folder = _saved(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(SokhanError, match="model.safetensors: not a readable safetensors file"):
        ckpt.load_model(folder)


def test_wrong_shapes_name_the_tensor_and_both_shapes(tmp_path):
    _, folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["vocab_size"] = 41  # the weights are for 40 tokens
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SokhanError, match=r"tensor 'embeddings.weight' has shape \(40, 32\), the model in config.json needs \(41, 32\)"):
        ckpt.load_model(folder)


def test_missing_tensors_and_files_are_named(tmp_path):
    _, folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["n_layers"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SokhanError, match=r"does not match the model in config.json: missing \d+ tensors \(e.g. 'layers.1"):
        ckpt.load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(SokhanError, match="config.json: no such file"):
        ckpt.load_model(folder)


def test_bad_model_section_names_the_key(tmp_path):
    _, folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["arch"] = "rnn"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SokhanError, match=r"config.json: config: model.arch = 'rnn' is not one of"):
        ckpt.load_model(folder)


@pytest.mark.parametrize("embedding_decay", [0.0, 0.05])
def test_checkpoint_restores_optimizer_rng_and_trainer_state(tmp_path, embedding_decay):
    model, run_config = _model("mamba")
    opt = build_optimizer(model, 1e-2, 0.1, embedding_weight_decay=embedding_decay)
    for _ in range(2):
        model(torch.randint(0, 40, (2, 5))).sum().backward()
        opt.step()
        opt.zero_grad()
    random.random(), np.random.rand()
    folder = ckpt.save_checkpoint(tmp_path, 7, model, opt, run_config, {"data": {"drawn": 3}, "best_val_loss": 1.5}, keep_last=2)
    expect = (torch.rand(3), random.random(), np.random.rand())

    fresh, _ = _model("mamba", d_model=32)
    fresh_opt = build_optimizer(fresh, 1e-2, 0.1, embedding_weight_decay=embedding_decay)
    torch.manual_seed(123), random.seed(1), np.random.seed(2)
    state = ckpt.load_checkpoint(folder, fresh, fresh_opt)
    assert state["step"] == 7 and state["data"] == {"drawn": 3} and state["best_val_loss"] == 1.5
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (expect[0].tolist(), expect[1], expect[2])
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
        a, b = opt.state[p], fresh_opt.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), n
    decays = [g["weight_decay"] for g in fresh_opt.param_groups]
    assert decays == ([0.1, 0.0, embedding_decay] if embedding_decay else [0.1, 0.0])


def test_keep_last_prunes_old_checkpoints_and_leaves_no_temporaries(tmp_path):
    model, run_config = _model()
    opt = build_optimizer(model, 1e-3, 0.0)
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path, step, model, opt, run_config, {"data": {}}, keep_last=2)
    assert [s for s, _ in ckpt.checkpoints(tmp_path)] == [6, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000006", "step_000008"]


def test_incomplete_checkpoint_is_named(tmp_path):
    model, run_config = _model()
    opt = build_optimizer(model, 1e-3, 0.0)
    folder = ckpt.save_checkpoint(tmp_path, 1, model, opt, run_config, {"data": {}}, keep_last=1)
    (folder / "trainer_state.safetensors").unlink()
    with pytest.raises(SokhanError, match="trainer_state.safetensors: no such file"):
        ckpt.load_checkpoint(folder, model, opt)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    import pickle

    model, run_config = _model("mamba")
    opt = build_optimizer(model, 1e-3, 0.0)
    folder = ckpt.save_checkpoint(tmp_path, 1, model, opt, run_config, {"data": {}}, keep_last=1)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while loading a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ckpt.load_model(folder)
    ckpt.load_checkpoint(folder, model, opt)


def test_a_failed_checkpoint_write_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """A full disk in the middle of a checkpoint left its 2.8 MB temporary folder, exactly when space was short."""
    import errno

    model, run_config = _model()
    opt = build_optimizer(model, 1e-3, 0.0)
    ckpt.save_checkpoint(tmp_path, 2, model, opt, run_config, {"data": {}}, keep_last=2)

    def full_disk(path, *args, **kwargs):
        path.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_tensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(tmp_path, 4, model, opt, run_config, {"data": {}}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002"]


def test_a_failed_tensor_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError):
        ckpt.write_tensors(tmp_path / "model.safetensors", {"w": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_remove_leftovers_deletes_dead_writes_and_keeps_the_rest(tmp_path):
    keep = ["step_000010", "best", ".fingerprint", ".fingerprint.json", "metrics.jsonl"]
    dead = [".step_000020.tmp16023", ".best.tmp16023", ".metrics.jsonl.tmp16023", ".loss.tmp16023.png",
            ".model.safetensors.tmp99", ".step_000010.old16023"]
    for name in keep + dead:
        if name.startswith(("step_", "best", ".step_", ".best")):
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"x")
        else:
            (tmp_path / name).write_text("x")
    ckpt.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_remove_leftovers_puts_back_a_folder_killed_between_its_renames(tmp_path):
    """write_folder renames the old folder away, then the new one in: killed in between, the old one is all there is."""
    (tmp_path / ".best.old123").mkdir()
    (tmp_path / ".best.old123" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / ".best.tmp123").mkdir()
    ckpt.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == b"weights"
