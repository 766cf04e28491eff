"""Data parallelism through ``torchrun``: process-group set-up, the DDP wrapper and the few collectives the loop needs.

``torchrun --nproc_per_node N -m sokhan train --run-dir RUN`` starts N copies; each reads ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` from the environment. Gradients are averaged by DDP (gloo on CPU, nccl on GPU);
rank 0 alone writes files. Without those variables everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes files and reports (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a process not started by torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: torch.device) -> World:
    """Join the process group torchrun describes (nccl for CUDA, gloo for CPU); a single process gets ``World()``."""
    if not launched():
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        _import_dynamo()
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world


def _import_dynamo() -> None:
    """Import ``torch._dynamo`` before the process group exists.

    DDP's constructor imports it; imported after ``init_process_group`` it keeps a reference to the default group
    (torch 2.13), so ``destroy_process_group`` no longer frees the group and its gloo threads live on into
    interpreter shutdown, where a worker aborted now and then ("terminate called without an active exception").
    Imported first, the group is freed in ``teardown`` and the process exits with no gloo thread left.
    """
    import torch._dynamo  # noqa: F401


def teardown(world: World, ok: bool = True) -> None:
    """Leave the process group together: after the barrier no peer is still in a collective when a rank closes its
    gloo pairs. (The barrier made a worker's abort at exit rarer, from about one run in six; the cause that was
    left, a group outliving ``destroy_process_group``, is ``_import_dynamo``'s.)

    ``ok = False`` (this rank failed) skips both: its peers are in some other collective (the backward all-reduce)
    and would never meet it at the barrier, and destroying a group whose peers are mid-collective can block too.
    The rank just exits with its error; torchrun sees it and stops the others. With its group still up it leaves
    without Python's shutdown (``sokhan.pipeline.cli._group_left``), which gloo's running threads made abort.
    """
    if ok and world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a tensor over processes (the same value on every rank)."""
    if not world.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world.size


def broadcast_int(value: int, world: World, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
