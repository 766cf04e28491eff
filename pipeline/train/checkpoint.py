"""Checkpoints: weights, optimizer, schedule, RNG and data position, written atomically and read without pickle.

A checkpoint is a folder::

    model.safetensors          weights (a tied output projection is stored once, under the embedding's name)
    config.json                the full resolved run config, ``model`` resolved (vocab_size included)
    trainer_state.safetensors  the optimizer's tensors and the torch RNG byte states (uint8)
    trainer_state.json         step, schedule, optimizer hyper-parameters, python/numpy RNG, data position, best val

The trained model folder ``RUN/train/`` has the first two files, so ``load_model`` reads both.
Folders are written under a temporary name and renamed, so a killed run leaves whole checkpoints or none; a failed
write removes its temporary folder, and the next run removes what a killed one left (``remove_leftovers``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sokhan import SokhanError
from sokhan.pipeline.stage import read_json, write_json
from sokhan.pipeline.train.folders import STEP_DIR, checkpoints, step_dir  # noqa: F401 (used by the loop as ckpt.*)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
# What an interrupted write leaves: ".<name>.tmp<pid>" (write_folder, write_tensors, atomic_write),
# ".<stem>.tmp<pid><suffix>" (plotting.save) and ".<name>.old<pid>" (write_folder's replaced folder).
LEFTOVER = re.compile(r"^\..+\.(tmp|old)\d+(\.\w+)?$")
TIED_KEY = "sokhan.tied"  # safetensors metadata: JSON {alias: stored name} for parameters shared between modules


def _safetensors_error(path: Path, e: Exception) -> SokhanError:
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    hint = ""
    stage = Path(path).parent
    if (stage / "manifest.json").exists():  # a finished stage's output: the stage can make it again
        hint = f"; `sokhan {stage.name} --run-dir {stage.parent} --force` makes it again"
    return SokhanError(f"{path}: not a readable safetensors file ({why}); the file is truncated or corrupt{hint}")


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a one-line SokhanError when it is missing or corrupt."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise SokhanError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # safetensors raises its own SafetensorError, OSError or ValueError by failure
        raise _safetensors_error(path, e) from None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: no half-written sibling left beside the file
        tmp.unlink(missing_ok=True)
        raise


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's state dict as safetensors, each shared (tied) tensor once; the aliases go in the metadata."""
    state = model.state_dict()
    stored: dict[tuple, str] = {}
    tensors, tied = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in stored:
            tied[name] = stored[key]
        else:
            stored[key] = name
            tensors[name] = t
    write_tensors(path, tensors, {TIED_KEY: json.dumps(tied)})


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``path`` into ``model``; missing, unexpected or misshapen tensors are a SokhanError naming the file."""
    path = Path(path)
    tensors, meta = read_tensors(path)
    try:
        tied = json.loads(meta.get(TIED_KEY, "{}"))
    except json.JSONDecodeError:
        raise SokhanError(f"{path}: metadata {TIED_KEY!r} is not valid JSON") from None
    for alias, name in tied.items():
        if name in tensors:
            tensors[alias] = tensors[name]
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        raise SokhanError(f"{path}: does not match the model in config.json: {', '.join(parts)}")
    for k, want in expected.items():
        if tuple(tensors[k].shape) != tuple(want.shape):
            raise SokhanError(f"{path}: tensor {k!r} has shape {tuple(tensors[k].shape)}, the model in config.json needs {tuple(want.shape)}")
    model.load_state_dict(tensors, strict=True)


def model_config(config_path: Path):
    """The resolved ``ModelConfig`` from a run config file (``config.json`` of a trained model or checkpoint)."""
    from sokhan.pipeline.config import from_dict
    from sokhan.pipeline.models.config import ModelConfig

    data = read_json(config_path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise SokhanError(f"{config_path}: no 'model' table; expected the run config the train stage writes")
    try:
        cfg = from_dict(ModelConfig, data["model"], prefix="model")
    except SokhanError as e:
        raise SokhanError(f"{config_path}: {e}") from None
    if cfg.vocab_size is None:
        raise SokhanError(f"{config_path}: model.vocab_size is not set; this is not a trained model's config")
    return cfg.resolve()


def load_model(train_dir: Path, device: str | torch.device = "cpu"):
    """The trained model in ``train_dir`` (``RUN/train`` or one of its checkpoints), in eval mode, and its config.

    Returns ``(model, ModelConfig)``. Reads ``config.json`` and ``model.safetensors``; never unpickles.
    """
    from sokhan.pipeline.models import build

    train_dir = Path(train_dir)
    cfg = model_config(train_dir / CONFIG_FILE)
    model = build(cfg)
    load_weights(model, train_dir / MODEL_FILE)
    return model.to(device).eval(), cfg


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every global generator's state: torch's byte states as tensors, python's and numpy's as JSON."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's per-parameter tensors (``optim.<index>.<name>``) and its JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], state: dict[str, Any], path: Path) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            per_param.setdefault(int(idx), {})[name] = v
    for key, v in state["scalars"].items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = v
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as e:
        raise SokhanError(f"{path}: optimizer state does not fit this model ({e})") from None
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.ndim and v.shape != p.shape:
                    raise SokhanError(f"{path}: optimizer tensor {k!r} has shape {tuple(v.shape)}, its parameter {tuple(p.shape)}")


def write_folder(final: Path, write) -> None:
    """Fill a temporary sibling of ``final`` with ``write(tmp_dir)``, then rename it to ``final`` (replacing it)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        # Most often a full disk: the half-written folder would hold space exactly when there is none, and no later
        # process (another pid) would ever remove it.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(folder: Path) -> None:
    """Delete what killed or failed writes left directly in ``folder`` (temporary files and folders), so that they are
    not published with it. Only for a folder no other process writes into (the run directory is locked; under
    torchrun only rank 0 writes): another writer's temporaries would go too."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir()):
        m = LEFTOVER.match(p.name)
        if not m:
            continue
        final = folder / p.name[1 : m.start(1) - 1]
        if m.group(1) == "old" and p.is_dir() and not final.exists():
            os.replace(p, final)  # killed between write_folder's two renames: the old folder is whole, and the only one
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def save_model_folder(folder: Path, model: nn.Module, run_config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """``model.safetensors`` + ``config.json`` (+ ``extra`` as ``info.json``) into ``folder``, atomically."""

    def write(tmp: Path) -> None:
        save_weights(model, tmp / MODEL_FILE)
        write_json(tmp / CONFIG_FILE, run_config)
        if extra is not None:
            write_json(tmp / "info.json", extra)

    write_folder(folder, write)


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_config: dict[str, Any],
    trainer: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``root/step_XXXXXX`` (atomically) and delete all but the newest ``keep_last`` step checkpoints."""
    opt_tensors, opt_json = optimizer_state(optimizer)
    rng_tensors, rng_json = rng_state()

    def write(tmp: Path) -> None:
        save_weights(model, tmp / MODEL_FILE)
        write_json(tmp / CONFIG_FILE, run_config)
        write_tensors(tmp / STATE_TENSORS, {**opt_tensors, **rng_tensors})
        write_json(tmp / STATE_JSON, {"step": step, **trainer, "optimizer": opt_json, "rng": rng_json})

    final = step_dir(root, step)
    write_folder(final, write)
    for _, old in checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimizer and global RNG from ``folder``; returns trainer_state.json (step, data, schedule…)."""
    folder = Path(folder)
    load_weights(model, folder / MODEL_FILE)
    state = read_json(folder / STATE_JSON)
    for key in ("step", "optimizer", "rng", "data"):
        if key not in state:
            raise SokhanError(f"{folder / STATE_JSON}: no {key!r}; the checkpoint is incomplete")
    tensors, _ = read_tensors(folder / STATE_TENSORS)
    if "rng.torch_cpu" not in tensors:
        raise SokhanError(f"{folder / STATE_TENSORS}: no 'rng.torch_cpu' tensor; the checkpoint is incomplete")
    load_optimizer_state(optimizer, tensors, state["optimizer"], folder / STATE_TENSORS)
    set_rng_state(tensors, state["rng"])
    return state
