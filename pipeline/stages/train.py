"""train stage: the model trained on RUN/tokenize shards from RUN/embed's table; resumable.

Writes ``RUN/train/model.safetensors`` + ``config.json`` (the final weights, or the best by validation loss with
``train.publish = "best"``), ``metrics.jsonl``, ``loss.png`` and ``checkpoints/`` (the last ``keep_last`` steps,
resumable, and ``best/``). Runs under ``torchrun --nproc_per_node N -m sokhan train`` as data parallelism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sokhan import SokhanError

SECTIONS = ("model", "train")
UPSTREAM = ("tokenize", "embed")
RESUMABLE = True
DISTRIBUTED = True  # every torchrun process calls run(); rank 0 alone writes (see stage.run_stage)
# Read by no later stage, and they hold wall-clock step times: training again to the same weights leaves export
# and evaluate up to date.
REPORTS = ("metrics.jsonl", "loss.png")


@dataclass
class TrainConfig:
    """The optimisation. Batches are per process: one step sees batch_size · grad_accum · processes windows."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Windows per process per micro-batch."""
    seq_len: int = 256
    """Tokens per window (the model predicts each from the ones before it in its window)."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed into one step (a larger batch in the same memory)."""
    lr: float = 3e-3
    """Peak learning rate, reached after ``warmup_steps``."""
    min_lr: float = 3e-4
    """Learning rate at the last step, the end of the cosine decay."""
    warmup_steps: int = 50
    """Steps of linear warmup, from ``lr / warmup_steps`` at the first step to ``lr``."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay of the weight matrices (norms, biases, Mamba's A_log and D never decay)."""
    embedding_weight_decay: float = 0.0
    """Weight decay of the token-embedding table (with it, a tied output projection): 0 leaves it out, as minGPT
    and mamba-ssm's recipe do; nanoGPT decays it like the other matrices."""
    grad_clip: float = 1.0
    """Maximum global gradient norm; 0 turns clipping off (the norm is still logged)."""
    eval_every: int = 100
    """Steps between validation losses (and at the last step)."""
    eval_batches: int = 8
    """Batches of held-out windows per validation loss: fixed windows, the same at every evaluation. Which windows
    depends on ``batch_size``, ``seq_len`` and ``seed``: compare validation losses across runs that share them
    (``sokhan evaluate`` scores the same text for any run)."""
    ckpt_every: int = 100
    """Steps between checkpoints (and at the last step); a killed run resumes from the newest."""
    keep_last: int = 2
    """Step checkpoints kept (the newest); checkpoints/best is kept besides."""
    seed: int = 0
    """Seeds the initialisation, the batch order, the validation windows and dropout: a run repeats bit for bit
    on the same machine."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when there is a GPU, else CPU."""
    compile: bool = False
    """torch.compile the model (worth it on CUDA for long runs; start-up costs minutes)."""
    publish: Literal["final", "best"] = "final"
    """Which weights become RUN/train/model.safetensors: the last step's or the best by validation loss."""

    def __post_init__(self) -> None:
        # TOML reads nan and inf as floats, and every comparison below is False for nan (grad_clip = nan would
        # silently turn clipping off, lr = inf would pass and diverge at step 1).
        for key in ("lr", "min_lr", "weight_decay", "embedding_weight_decay", "grad_clip"):
            if not math.isfinite(getattr(self, key)):
                raise SokhanError(f"config: train.{key} = {getattr(self, key)} must be a finite number")
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "ckpt_every", "keep_last"):
            if getattr(self, key) < 1:
                raise SokhanError(f"config: train.{key} = {getattr(self, key)} must be ≥ 1")
        if self.warmup_steps < 0:
            raise SokhanError(f"config: train.warmup_steps = {self.warmup_steps} must be ≥ 0")
        if self.lr <= 0:
            raise SokhanError(f"config: train.lr = {self.lr} must be > 0")
        if not 0 < self.min_lr <= self.lr:
            raise SokhanError(f"config: train.min_lr = {self.min_lr} must be > 0 and ≤ train.lr = {self.lr}")
        for key in ("weight_decay", "embedding_weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise SokhanError(f"config: train.{key} = {getattr(self, key)} must be ≥ 0")


def add_arguments(parser) -> None:
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted run in RUN/train.partial from its newest checkpoint "
                             "(automatic when one is there with the same config; this flag makes its absence an error)")


def resumable_work(partial: Path) -> bool:
    """An interrupted run can be resumed once it has written a checkpoint."""
    from sokhan.pipeline.train.folders import checkpoints

    return bool(checkpoints(partial / "checkpoints"))


def resumable_step(partial: Path) -> int | None:
    """The step an interrupted run would continue from (its newest checkpoint), or None (``sokhan status``)."""
    from sokhan.pipeline.train.folders import checkpoints

    found = checkpoints(partial / "checkpoints")
    return found[-1][0] if found else None


def run(ctx) -> dict:
    from sokhan.pipeline.stage import log
    from sokhan.pipeline.stages.tokenize import read_meta
    from sokhan.pipeline.train import ddp
    from sokhan.pipeline.train.checkpoint import checkpoints
    from sokhan.pipeline.train.loop import resolved_run_config, train

    tokenize_dir = ctx.upstream("tokenize")
    embed_dir = ctx.upstream("embed")
    meta = read_meta(tokenize_dir)
    model_cfg = ctx.config.model.resolve(int(meta["vocab_size"]))
    main = ddp.is_main_process()
    cfg = ctx.config.train
    if main and (cfg.warmup_steps > cfg.steps or (cfg.steps > 1 and cfg.warmup_steps >= cfg.steps - 1)):
        # Allowed (a short trial run), but the cosine needs two steps after the warmup to reach min_lr (lr_at).
        if cfg.warmup_steps > cfg.steps:
            where = f"is still warming up when training ends (it peaks at {cfg.lr * cfg.steps / cfg.warmup_steps:.3g})"
        else:
            where = f"reaches train.lr = {cfg.lr:g} and ends there"
        log(f"train: train.warmup_steps = {cfg.warmup_steps} leaves train.steps = {cfg.steps} no room for the cosine "
            f"decay: the learning rate {where}, never train.min_lr = {cfg.min_lr:g}")
    if main and getattr(ctx.args, "resume", False) and not (ctx.resumed and checkpoints(ctx.out / "checkpoints")):
        raise SokhanError(
            f"--resume: no checkpoint of an interrupted run with this config in {ctx.out} "
            "(a changed config or --force starts afresh); run without --resume"
        )
    return train(
        ctx.config.train,
        model_cfg,
        resolved_run_config(ctx.config, model_cfg),
        tokenize_dir,
        embed_dir / "embeddings.safetensors",
        ctx.out,
        resume=ctx.resumed or not main,
    )
