"""train stage: the model trained on RUN/tokenize shards from RUN/embed's table; resumable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SECTIONS = ("model", "train")
UPSTREAM = ("tokenize", "embed")
RESUMABLE = True


@dataclass
class TrainConfig:
    """The optimisation."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_last: int = 2
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False


def run(ctx) -> dict:
    raise NotImplementedError("train stage: being written this session")
