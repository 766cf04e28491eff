"""The training loop: batches in, AdamW steps, validation, checkpoints, metrics; resumable bit for bit on CPU.

One optimizer step is ``grad_accum`` micro-batches of ``batch_size`` windows per process. Everything a step depends
on (weights, optimizer moments, step count, the data generator, the global RNGs) is in each checkpoint, so a run
killed after checkpoint n and resumed from it repeats the uninterrupted run's losses exactly on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sokhan import SokhanError, machine_error
from sokhan.kernels import dispatch
from sokhan.pipeline.stage import atomic_write, log, progress, write_json
from sokhan.pipeline.stages.tokenize import read_meta
from sokhan.pipeline.train import checkpoint as ckpt
from sokhan.pipeline.train import ddp
from sokhan.pipeline.train.data import Batches, open_shard, validation_batches
from sokhan.pipeline.train.optim import build_optimizer, lr_at, set_lr

METRICS = "metrics.jsonl"
VALIDATION_SEED_OFFSET = 1_000_003  # the validation batches' generator seed, apart from the training stream's


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats; inputs and targets (B, L)."""
    # Through the model's forward (so DDP sees the call), which hands its last hidden states and output projection
    # to linear_cross_entropy: on CPU the logits are made and consumed a few rows at a time, on CUDA the fused
    # kernel reads the bf16 logits once.
    return model(inputs, targets=targets)


def resolve_device(name: str, world: ddp.World) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SokhanError("config: train.device = 'cuda' but torch sees no CUDA device (use 'auto' or 'cpu')")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    device = torch.device("cuda", world.local_rank)
    torch.cuda.set_device(device)
    return device


_COUNT_CHUNK = 1 << 24  # tokens counted at a time


def unigram_val_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation shard under the training shard's add-one unigram: the bar to beat."""
    def token_counts(shard: np.ndarray) -> np.ndarray:
        # A chunk at a time: bincount widens its input to int64, 4× a uint16 shard, and the shards are memmaps.
        return sum((np.bincount(shard[i : i + _COUNT_CHUNK], minlength=vocab_size) for i in range(0, len(shard), _COUNT_CHUNK)),
                   np.zeros(vocab_size, dtype=np.int64))

    counts = token_counts(train).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-(token_counts(val) @ logp) / len(val))


def reseed_rank(seed: int, world: ddp.World, step: int) -> None:
    """Under torchrun, a generator of its own for each process after the first, for its dropout masks: with the
    one seed everywhere every rank drew the same masks (for other windows), which one process on the doubled batch
    does not. Rank 0's state travels in the checkpoints; the others' is derived from the step, renewed at each
    checkpoint step, so that a run resumed from one draws what the uninterrupted run drew."""
    if world.rank > 0:
        torch.manual_seed(seed + 1_000_003 * world.rank + step)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, device: torch.device, autocast) -> float:
    model.eval()
    losses = []
    for x, y in batches:
        with autocast():
            losses.append(lm_loss(model, x.to(device), y.to(device)).item())
    model.train()
    return float(np.mean(losses))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext  # float32 on CPU: bf16 matmuls there are slower and lose the exact resume


def load_embeddings(model: nn.Module, path: Path) -> None:
    """Copy RUN/embed's table into the model's input embedding (and so into a tied output projection)."""
    tensors, _ = ckpt.read_tensors(path)
    if "embeddings" not in tensors:
        raise SokhanError(f"{path}: no 'embeddings' tensor (has {', '.join(sorted(tensors)) or 'none'}); rerun `sokhan embed --force`")
    table = tensors["embeddings"]
    weight = model.get_input_embeddings().weight
    if tuple(table.shape) != tuple(weight.shape):
        raise SokhanError(
            f"{path}: embeddings have shape {tuple(table.shape)}, the model needs (vocab_size, d_model) = {tuple(weight.shape)}; "
            "rerun `sokhan embed --force` after changing the model or tokenizer"
        )
    with torch.no_grad():
        weight.copy_(table.to(weight.dtype))


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Records of a killed attempt up to its checkpoint's step; later ones are repeated by the resumed run."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # the killed attempt's last line may be half-written
            continue
        if rec.get("step", math.inf) <= up_to_step:
            records.append(rec)
    return records


def plot_loss(records: list[dict[str, Any]], path: Path, unigram: float | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sokhan.pipeline import plotting

    plotting.setup_fonts()
    fig, ax = plt.subplots(figsize=(8, 5))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", ms=4, label="validation loss")
    if unigram is not None:
        ax.axhline(unigram, color="grey", ls="--", lw=1, label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    plotting.save(fig, path)


def train(
    cfg,
    model_cfg,
    run_config: dict[str, Any],
    tokenize_dir: Path,
    embeddings: Path | None,
    out: Path,
    resume: bool,
) -> dict[str, Any]:
    """Train ``model_cfg`` (resolved) with ``cfg`` (TrainConfig) into ``out``; returns the summary metrics.

    ``run_config`` is the full resolved run config stored with every checkpoint. With ``resume`` the newest
    checkpoint in ``out/checkpoints`` is continued. Under torchrun only rank 0 writes; every rank returns metrics.
    """
    out = Path(out)
    world = ddp.setup(torch.device("cuda") if cfg.device != "cpu" and torch.cuda.is_available() else torch.device("cpu"))
    ok = False
    try:
        device = resolve_device(cfg.device, world)
        summary = _train(cfg, model_cfg, run_config, Path(tokenize_dir), embeddings, out, resume, world, device)
        ok = True
        return summary
    finally:
        # A failed rank must not wait at teardown's barrier: its peers are stuck in the next all-reduce instead.
        ddp.teardown(world, ok=ok)


def _diverged(what: str, step: int, root: Path, cfg) -> SokhanError:
    """The error that stops a diverged run before its optimizer step; the weights on disk stay the last good ones."""
    good = ckpt.checkpoints(root)
    where = f"the last good checkpoint is {good[-1][1]}" if good else "no checkpoint was written before it"
    return SokhanError(f"train: {what} at step {step}; stopped ({where}). Lower train.lr (now {cfg.lr}) or raise train.warmup_steps")


@contextlib.contextmanager
def _writing(what: Path, root: Path):
    """A machine's failure while writing a checkpoint (a full disk, most often; safetensors reports it as its own
    error, not an OSError) as one line saying what the run keeps."""
    try:
        yield
    except Exception as e:
        problem = machine_error(e)
        if problem is None:
            raise
        good = ckpt.checkpoints(root)
        keeps = f"rerun to resume from {good[-1][1]}" if good else "no checkpoint was written before it"
        raise SokhanError(f"train: cannot write {what} ({problem}); {keeps}") from None


def _duration(seconds: float) -> str:
    """``42s``, ``35m``, ``2h05m``: an ETA to the minute, seconds only under one."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes = round(seconds / 60)
    return f"{minutes}m" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _load_newest_readable(found: list[tuple[int, Path]], model, optimizer) -> dict[str, Any]:
    """Load the newest of ``found`` (step, folder) that reads back whole; returns its trainer state.

    A checkpoint damaged after it was written (a disk filling up, a copy cut short) costs the steps since the one
    before it, not the run: each unreadable one is named in a warning and the one before it is tried.
    """
    errors = []
    for step, folder in reversed(found):
        try:
            state = ckpt.load_checkpoint(folder, model, optimizer)
        except SokhanError as e:
            errors.append(str(e))
            log(f"train: warning: cannot resume from {folder} ({e}); trying the checkpoint before it")
            continue
        if int(state["step"]) != step:
            raise SokhanError(f"{folder}: trainer state says step {state['step']}, the folder name step {step}")
        return state
    raise SokhanError(f"no readable checkpoint to resume from in {found[-1][1].parent} ({errors[0]}); "
                      "rerun with --force to start afresh")


def _train(cfg, model_cfg, run_config, tokenize_dir, embeddings, out, resume, world, device) -> dict[str, Any]:
    from sokhan.pipeline.models import build

    meta = read_meta(tokenize_dir)
    train_shard = open_shard(tokenize_dir / "train.bin", meta["dtype"], cfg.seq_len + 1)
    val_shard = open_shard(tokenize_dir / "val.bin", meta["dtype"], cfg.seq_len + 1,
                           "raise tokenize.val_fraction, lower train.seq_len or add text")

    top = int(max(train_shard.max(), val_shard.max()))
    if top >= model_cfg.vocab_size:
        raise SokhanError(
            f"{tokenize_dir}: token id {top} in the shards is outside the vocabulary ({model_cfg.vocab_size} in meta.json); "
            "rerun `sokhan tokenize --force`"
        )
    if model_cfg.arch == "transformer" and cfg.seq_len > model_cfg.max_seq_len:
        raise SokhanError(f"config: train.seq_len = {cfg.seq_len} exceeds model.max_seq_len = {model_cfg.max_seq_len}")

    # Python's and numpy's generators too: nothing here draws from them, but checkpoints save their states (for
    # whatever a later version draws), and unseeded they made two identical runs' checkpoints differ in bytes.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build(model_cfg).to(device)
    if embeddings is not None:
        load_embeddings(model, embeddings)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, embedding_weight_decay=cfg.embedding_weight_decay)
    batches = Batches(train_shard, cfg.batch_size, cfg.seq_len, cfg.seed, world.rank, world.size)
    val_batches = validation_batches(val_shard, cfg.batch_size, cfg.seq_len, cfg.eval_batches, cfg.seed + VALIDATION_SEED_OFFSET)

    root = out / "checkpoints"
    if world.main:  # the run directory is locked and only rank 0 writes: any temporary here is a dead write's
        ckpt.remove_leftovers(out)
        ckpt.remove_leftovers(root)
    found = ckpt.checkpoints(root) if (resume and world.main) else []
    state = _load_newest_readable(found, model, optimizer) if found else None
    start = ddp.broadcast_int(state["step"] if state else 0, world, device)
    best_val, best_step = math.inf, None
    if start:
        if state is None:  # the other ranks load what rank 0 chose
            state = ckpt.load_checkpoint(ckpt.step_dir(root, start), model, optimizer)
        batches.load_state(state["data"])
        best_val = state.get("best_val_loss") if state.get("best_val_loss") is not None else math.inf
        best_step = state.get("best_step")
        # A best folder written after that checkpoint (the killed run went on improving) is what publish = "best"
        # would publish: its figures, not the checkpoint's, or the manifest named other weights than it published.
        # (On CPU the resumed steps repeat and would write it again; on a GPU, or with another process count, not.)
        try:
            best = json.loads((root / "best" / "info.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none, or damaged: the checkpoint's figures
            best = {}
        if isinstance(best, dict) and best.get("step", 0) > start and best.get("val_loss") is not None:
            best_val, best_step = best["val_loss"], best["step"]
        if world.main:
            log(f"train: resuming from {ckpt.step_dir(root, start)}")
            was = state.get("world_size", 1)
            if was != world.size:  # each process draws its own batches: the steps from here see other data
                log(f"train: the interrupted run had {was} process(es), this one has {world.size}: each step now takes "
                    f"{world.size}/{was} as many windows, so the run continues but no longer repeats the uninterrupted one "
                    f"(resume with {was} for that)")

    reseed_rank(cfg.seed, world, start)
    forward = torch.compile(model) if cfg.compile else model
    train_model = ddp.wrap(forward, world, device)
    autocast = _autocast(device)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world.size

    metrics_path = out / METRICS
    records = _read_metrics(metrics_path, start) if world.main else []
    if world.main:  # atomically: a failed rewrite in place would lose the records before the checkpoint
        atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
    unigram = unigram_val_loss(train_shard, val_shard, model_cfg.vocab_size) if world.main else None

    def trainer_state(step: int, lr: float) -> dict[str, Any]:
        return {
            "schedule": {"kind": "warmup_cosine", "lr": lr, "peak_lr": cfg.lr, "min_lr": cfg.min_lr,
                         "warmup_steps": cfg.warmup_steps, "total_steps": cfg.steps},
            "data": batches.state(),
            "best_val_loss": None if math.isinf(best_val) else best_val,
            "best_step": best_step,
            "world_size": world.size,
        }

    bar = progress(total=cfg.steps, initial=start, desc=f"train {model_cfg.arch}") if world.main else None
    # Without a bar (stderr not a terminal: a log file) each evaluation gets a line instead, or a long run says nothing.
    log_evals = bar is not None and bar.disable
    postfix = {}
    model.train()
    last = {}
    t_start = time.perf_counter()
    with open(metrics_path, "a", encoding="utf-8") if world.main else contextlib.nullcontext() as mf:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(step - 1, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = batches.next()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # Gradients are averaged across processes once per optimizer step, on the last micro-batch.
                sync = contextlib.nullcontext() if (micro == cfg.grad_accum - 1 or not world.distributed) else train_model.no_sync()
                with sync:
                    with autocast():
                        loss = lm_loss(train_model, x, y) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            loss_value = ddp.mean(loss_sum, world).item()
            if not math.isfinite(loss_value):
                raise _diverged(f"loss is {loss_value}", step, root, cfg)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
            if not math.isfinite(grad_norm):
                raise _diverged(f"gradient norm is {grad_norm}", step, root, cfg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0

            rec = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_step / dt, "step_time_s": dt}
            if world.main and (step % cfg.eval_every == 0 or step == cfg.steps):
                rec["val_loss"] = evaluate(model, val_batches, device, autocast)
                if not math.isfinite(rec["val_loss"]):  # finite training loss, overflow on held-out text: diverged too
                    raise _diverged(f"validation loss is {rec['val_loss']}", step, root, cfg)
                if rec["val_loss"] < best_val:
                    best_val, best_step = rec["val_loss"], step
                    with _writing(root / "best", root):
                        ckpt.save_model_folder(root / "best", model, run_config, {"step": step, "val_loss": best_val})
                postfix["val"] = f"{rec['val_loss']:.3f}"
                if log_evals:
                    per_step = (time.perf_counter() - t_start) / (step - start)  # evaluations and checkpoints included
                    pace = f"{per_step:.3g} s/step" if per_step >= 1 else f"{per_step * 1e3:.3g} ms/step"
                    log(f"train: step {step}/{cfg.steps}  loss {loss_value:.3f}  val {rec['val_loss']:.3f}  "
                        f"{pace}  eta {_duration(per_step * (cfg.steps - step))}")
            if world.main:
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                records.append(rec)
                bar.set_postfix(loss=f"{loss_value:.3f}", **postfix, tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
            if world.main and (step % cfg.ckpt_every == 0 or step == cfg.steps):
                with _writing(ckpt.step_dir(root, step), root):
                    ckpt.save_checkpoint(root, step, model, optimizer, run_config, trainer_state(step, lr), cfg.keep_last)
            if step % cfg.ckpt_every == 0:
                reseed_rank(cfg.seed, world, step)
            last = rec
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_start

    last = last or (records[-1] if records else {})  # resumed with nothing left to run: the last recorded step
    summary = {
        "arch": model_cfg.arch,
        "parameters": n_params,
        "steps": cfg.steps,
        "resumed_from_step": start,
        "world_size": world.size,
        "device": str(device),
        # What ran, though not in the fingerprint: the backends agree to rounding, not to the bit.
        "kernels": dispatch.requested(),
        "tokens_per_step": tokens_per_step,
        "final_loss": last.get("loss"),
        "final_val_loss": last.get("val_loss"),
        "best_val_loss": None if math.isinf(best_val) else best_val,
        "best_step": best_step,
        "unigram_val_loss": unigram,
        "published": cfg.publish,
        "tokens_per_s": (tokens_per_step * (cfg.steps - start) / wall) if cfg.steps > start and wall > 0 else None,
    }
    if world.main:
        if cfg.publish == "best" and (root / "best" / ckpt.MODEL_FILE).exists():
            for name in (ckpt.MODEL_FILE, ckpt.CONFIG_FILE):
                atomic_write(out / name, (root / "best" / name).read_bytes())
        else:
            ckpt.save_weights(model, out / ckpt.MODEL_FILE)
            write_json(out / ckpt.CONFIG_FILE, run_config)
        plot_loss(records, out / "loss.png", unigram, f"{model_cfg.arch}, {n_params / 1e6:.2f}M parameters")
    return summary


def resolved_run_config(config, model_cfg) -> dict[str, Any]:
    """The run config as stored with checkpoints: every section, the model section resolved."""
    from sokhan.pipeline.config import to_dict

    data = to_dict(config)
    data["model"] = asdict(model_cfg)
    return data
