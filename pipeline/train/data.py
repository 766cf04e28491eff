"""Token batches from the memory-mapped shards (``RUN/tokenize/train.bin``, ``val.bin``).

A batch is ``batch_size`` windows of ``seq_len + 1`` tokens at offsets drawn from a seeded ``torch.Generator``:
inputs are the first ``seq_len`` tokens of each window, targets the last ``seq_len``. The generator's state and the
number of batches drawn are the data position a checkpoint stores, so a resumed run draws the same batches.

Under data parallelism every process draws the offsets of the whole global batch (``batch_size · world_size``)
and keeps its own slice: the union over processes is exactly the batch one process would draw with
``batch_size · world_size``, which is what makes a 2-process run comparable to a 1-process run on the doubled batch.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import torch

from sokhan import SokhanError


def open_shard(path: Path, dtype: str, min_tokens: int, remedy: str = "lower train.seq_len or add text") -> np.memmap:
    """The shard as a read-only 1-D memmap; a SokhanError if it is missing or shorter than ``min_tokens`` (one
    window of train.seq_len + 1), ending with ``remedy``."""
    path = Path(path)
    if not path.exists():
        raise SokhanError(f"{path}: no such token shard; run `sokhan tokenize` first")
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:
        raise SokhanError(f"{path.parent / 'meta.json'}: dtype {dtype!r} is not a numpy dtype (expected uint16 or uint32)") from None
    size = path.stat().st_size
    if size % itemsize:
        raise SokhanError(f"{path}: {size} bytes is not a whole number of {dtype} tokens; the shard is truncated or meta.json's dtype is wrong")
    n = size // itemsize
    if n < min_tokens:
        raise SokhanError(
            f"{path}: {n} tokens, fewer than one window of train.seq_len + 1 = {min_tokens}; {remedy}"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def windows(shard: np.ndarray, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, seq_len) int64 from the windows starting at ``offsets`` (B,)."""
    rows = np.stack([np.asarray(shard[o : o + seq_len + 1]) for o in offsets.tolist()]).astype(np.int64)
    xy = torch.from_numpy(rows)  # (B, seq_len + 1)
    return xy[:, :-1], xy[:, 1:]


class Batches:
    """Random training batches; ``state()`` / ``load_state()`` are the data position."""

    def __init__(self, shard: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1):
        self.shard, self.batch_size, self.seq_len = shard, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0  # batches drawn so far

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's (inputs, targets), each (batch_size, seq_len) int64."""
        high = len(self.shard) - self.seq_len  # last valid start + 1
        offsets = torch.randint(0, high, (self.batch_size * self.world_size,), generator=self.generator)
        mine = offsets[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.drawn += 1
        return windows(self.shard, mine, self.seq_len)

    def state(self) -> dict:
        return {"generator": base64.b64encode(self.generator.get_state().numpy().tobytes()).decode(), "drawn": self.drawn}

    def load_state(self, state: dict) -> None:
        raw = np.frombuffer(base64.b64decode(state["generator"]), dtype=np.uint8).copy()
        self.generator.set_state(torch.from_numpy(raw))
        self.drawn = int(state["drawn"])


def validation_batches(shard: np.ndarray, batch_size: int, seq_len: int, n_batches: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``n_batches`` validation batches every time (a fixed seed), so validation losses compare across steps."""
    g = torch.Generator().manual_seed(seed)
    high = len(shard) - seq_len
    return [windows(shard, torch.randint(0, high, (batch_size,), generator=g), seq_len) for _ in range(n_batches)]
