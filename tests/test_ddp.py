"""torchrun data parallelism: 2 gloo processes on CPU end where 1 process on the doubled batch ends; a rank that
fails does not leave the others waiting."""

from __future__ import annotations

import json
import errno
import os
import shutil
import subprocess
import sys

import pytest
from tiny_run import ONE_THREAD_ENV, make_tiny_run, tiny_config

from sokhan import SokhanError
from sokhan.pipeline.stage import run_stage, save_run_config
from sokhan.pipeline.train import checkpoint as ckpt
from sokhan.pipeline.train import ddp

STEPS = 6
COMMON = [f"train.steps={STEPS}", "train.seq_len=16", "train.ckpt_every=3", "train.eval_every=3", "train.grad_accum=2"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_doubled_batch(tmp_path):
    base = make_tiny_run(tmp_path / "base")
    run_stage("embed", tiny_config(), base)

    single = shutil.copytree(base, tmp_path / "single")
    run_stage("train", tiny_config(*COMMON, "train.batch_size=4"), single)

    multi = shutil.copytree(base, tmp_path / "multi")
    save_run_config(multi, tiny_config(*COMMON, "train.batch_size=2"))
    env = _two_processes_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sokhan", "train", "--run-dir", str(multi)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    out = multi / "train"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2
    assert manifest["metrics"]["tokens_per_step"] == 2 * 2 * 16 * 2  # per-rank batch · seq_len · grad_accum · ranks
    assert not (multi / "train.partial").exists()  # rank 0 published; rank 1 wrote nothing of its own

    a = ckpt.read_tensors(single / "train" / "model.safetensors")[0]
    b = ckpt.read_tensors(out / "model.safetensors")[0]
    assert a.keys() == b.keys()
    # Float32, same examples; only the order of the gradient sums differs (gloo all-reduce vs one batch), which
    # Adam's normalisation can amplify to a few ulps of lr per step: 1e-5 absolute on weights of size ~0.02-1.
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    moved = max((a[k] - ckpt.read_tensors(single / "train" / "checkpoints" / "step_000003" / "model.safetensors")[0][k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the comparison is not vacuous: training changed the weights by far more than the tolerance

    la = [json.loads(x)["loss"] for x in (single / "train" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lb == pytest.approx(la, rel=1e-5)


def _two_processes_env():
    env = {**os.environ, **ONE_THREAD_ENV}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


@pytest.mark.parametrize("ok", [True, False])
def test_teardown_meets_the_other_ranks_only_after_a_success(monkeypatch, ok):
    """A failed rank waited at the barrier while its peer waited in the backward all-reduce: forever."""
    calls = []
    monkeypatch.setattr(ddp.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ddp.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(ddp.dist, "destroy_process_group", lambda: calls.append("destroy"))
    ddp.teardown(ddp.World(rank=0, local_rank=0, size=2), ok=ok)
    assert calls == (["barrier", "destroy"] if ok else [])


def test_the_loop_tells_teardown_whether_it_failed(tmp_path, monkeypatch):
    run = make_tiny_run(tmp_path)
    run_stage("embed", tiny_config(), run)
    seen = []
    monkeypatch.setattr(ddp, "teardown", lambda world, ok=True: seen.append(ok))
    run_stage("train", tiny_config("train.steps=2"), run)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk)
    with pytest.raises(SokhanError, match="cannot write .*step_000002 .*No space left on device"):
        run_stage("train", tiny_config("train.steps=2"), run, force=True)
    assert seen == [True, False]


# Run as a torchrun worker: rank 0's disk fills up in the middle of its first checkpoint.
FULL_DISK = """
import errno, os, sys

from sokhan.pipeline.cli import main
from sokhan.pipeline.train import checkpoint as ckpt

real = ckpt.write_tensors


def full(path, *args, **kwargs):
    if os.environ["RANK"] == "0" and path.name == ckpt.STATE_TENSORS:
        path.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(path, *args, **kwargs)


ckpt.write_tensors = full
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_full_disk_on_rank_0_stops_both_processes(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    run_stage("embed", tiny_config(), run)
    save_run_config(run, tiny_config(*COMMON, "train.batch_size=2"))
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "train", "--run-dir", str(run)]
    # stderr to a file, not a pipe: after a hang, workers that outlive torchrun would hold a pipe open.
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err_out:
        proc = subprocess.Popen(cmd, env=_two_processes_env(), stdout=subprocess.DEVNULL, stderr=err_out)
        try:
            proc.wait(timeout=120)  # about 6 s; it hung forever before
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its workers on SIGTERM (they run in sessions of their own)
            proc.wait(timeout=60)
            pytest.fail("rank 0 failed to write a checkpoint and the processes still ran after 120 s")
    err = err_file.read_text()
    assert proc.returncode != 0
    assert "sokhan: error: train: cannot write" in err and "No space left on device" in err, err[-3000:]
    # The first checkpoint failed: nothing to resume, so nothing kept (the half-written folder went with it).
    assert not (run / "train.partial").exists() and not (run / "train").exists()


# Run as a torchrun worker: DDP around a model, one backward, teardown, then the threads this process still has.
GLOO_THREADS = """
import json, os, sys
import torch
from torch import nn
from sokhan.pipeline.train import ddp

world = ddp.setup(torch.device("cpu"))
model = ddp.wrap(nn.Linear(4, 4), world, torch.device("cpu"))  # DDP's constructor imports torch._dynamo
model(torch.randn(2, 4)).sum().backward()
del model
ddp.teardown(world)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(os.path.join(sys.argv[1], f"rank{world.rank}.json"), "w") as f:  # a file each: their stdout interleaves
    json.dump(sorted(names), f)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from Linux's /proc")
def test_teardown_frees_the_process_group_and_its_gloo_threads(tmp_path):
    """torch._dynamo imported after init_process_group (by DDP) kept the group alive past destroy_process_group:
    its gloo threads ran into interpreter shutdown, where a worker aborted now and then (seen in CI)."""
    script = tmp_path / "gloo_threads.py"
    script.write_text(GLOO_THREADS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)]
    done = subprocess.run(cmd, env=_two_processes_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "python" in threads  # the names were read
        assert not [t for t in threads if "gloo" in t], (rank, threads)  # gloo_tcp_loop, pt_gloo_runloop before


# Run as a torchrun worker: both processes get SIGTERM at their fourth loss report (a scheduler stopping the job);
# a marker file says whether Python's shutdown ran (atexit handlers run there).
SIGTERM_BOTH = """
import atexit, os, signal, sys
from pathlib import Path

from sokhan.pipeline.cli import main
from sokhan.pipeline.train import ddp

atexit.register(lambda: Path(sys.argv[1], f"rank{os.environ['RANK']}.shutdown").touch())
real, calls = ddp.mean, []


def mean(value, world):
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(value, world)


ddp.mean = mean
sys.exit(main(sys.argv[2:]))
"""


def test_stopped_processes_leave_without_a_shutdown_among_gloo_threads(tmp_path):
    """Stopped or failed, a rank skips the group's destruction (its peers may be in a collective), and Python's
    shutdown with gloo's threads still running aborted now and then (exit 134 and a core file after the clean
    line). Such a process now ends without that shutdown, with its own exit status, its checkpoints kept."""
    run = make_tiny_run(tmp_path / "run")
    run_stage("embed", tiny_config(), run)
    save_run_config(run, tiny_config(*COMMON, "train.batch_size=2", "train.ckpt_every=1"))
    script = tmp_path / "sigterm_both.py"
    script.write_text(SIGTERM_BOTH)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path), "train", "--run-dir", str(run)]
    done = subprocess.run(cmd, env=_two_processes_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert done.stderr.count("sokhan: terminated (SIGTERM)") == 2, done.stderr[-3000:]
    assert "exitcode  : 143" in done.stderr and "terminate called" not in done.stderr, done.stderr[-3000:]
    assert not list(tmp_path.glob("rank*.shutdown"))  # neither process went through Python's shutdown
    assert ckpt.checkpoints(run / "train.partial" / "checkpoints")  # what it had trained is kept to resume from


def test_each_process_draws_its_own_dropout_masks_and_resumes_them():
    """Every rank was seeded alike, so all drew the same dropout masks (for different windows)."""
    import torch

    from sokhan.pipeline.train.loop import reseed_rank

    def draws(rank: int, step: int, before: int) -> torch.Tensor:
        torch.manual_seed(before)  # whatever the process drew until then
        reseed_rank(7, ddp.World(rank, rank, 2), step)
        return torch.rand(16)

    torch.manual_seed(7)
    own = torch.rand(16)
    assert torch.equal(draws(0, 0, 7), own)  # rank 0 keeps its stream, which checkpoints carry
    assert not torch.equal(draws(1, 0, 7), draws(0, 0, 7))
    # Renewed at each checkpoint step from the step alone: a rank resumed there draws what it drew uninterrupted.
    assert torch.equal(draws(1, 6, 123), draws(1, 6, 456)) and not torch.equal(draws(1, 6, 1), draws(1, 3, 1))
