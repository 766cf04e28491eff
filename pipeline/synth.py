"""`sokhan synth`: the Mamba paper's synthetic tasks, selective copying and induction heads, on CPU.

Selective copying: a region of ``seq_len`` tokens holds ``n_data`` symbols at random positions among noise tokens,
followed by ``n_data`` marker tokens; at the markers the model must output the symbols in order. Where the
symbols sit changes from example to example, so a time-invariant (LTI) model, whose convolution kernel is the same
for every input, cannot know what to keep; a selective one can gate the noise out.

Induction heads: random symbols with one trigger token somewhere in them, the symbol after it, and the trigger
again at the end; the model must predict the symbol that followed the first trigger. Trained at ``induction_len`` and
tested at longer lengths as well (extrapolation).

Data are generated on the fly from fixed seeds (training and test streams apart). Each architecture (``mamba``,
``mamba`` with ``selective = false``, ``transformer``) trains for ``steps`` steps; accuracy is the share of answer
tokens predicted right (argmax). Results go to ``OUT/synth.json`` and ``OUT/synth.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sokhan import SokhanError

ARCHS = {"mamba": ("mamba", True), "mamba-lti": ("mamba", False), "transformer": ("transformer", True)}
TASKS = ("selective_copying", "induction_heads")
IGNORE = -100
LOG_LINES = 10  # progress lines per model and task, however many steps: a fixed interval floods a long run's log


@dataclass
class SynthConfig:
    """Task sizes and the training budget (the default runs in a few minutes on 2 CPU cores)."""

    seq_len: int = 16
    """Selective copying: length of the region holding the symbols."""
    n_data: int = 4
    """Selective copying: symbols to copy."""
    n_symbols: int = 8
    induction_len: int = 32
    """Induction heads: training length."""
    test_lengths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    """Induction heads: lengths to test at."""
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    eval_examples: int = 256
    seed: int = 0
    threads: int = 1
    """torch CPU threads; these models are so small that more threads mostly wait on each other."""

    def __post_init__(self) -> None:
        if self.n_data >= self.seq_len:
            raise SokhanError(f"synth: --n-data {self.n_data} must be below --seq-len {self.seq_len}")
        if min(self.seq_len, self.induction_len, *self.test_lengths) < 4:
            raise SokhanError("synth: sequence lengths must be ≥ 4")
        for key in ("n_symbols", "steps", "batch_size", "eval_examples", "d_model", "n_layers", "threads"):
            if getattr(self, key) < 1:
                raise SokhanError(f"synth: {key} = {getattr(self, key)} must be ≥ 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SokhanError(f"synth: lr = {self.lr} must be a finite number > 0")


def selective_copying(rng: np.random.Generator, batch: int, seq_len: int, n_data: int, n_symbols: int):
    """inputs (B, seq_len + n_data) int64 and targets (same shape, IGNORE except at the markers).

    Ids: 0 noise, 1 marker, 2 .. n_symbols + 1 the symbols. Vocabulary size n_symbols + 2.
    """
    x = np.zeros((batch, seq_len + n_data), np.int64)
    y = np.full_like(x, IGNORE)
    x[:, seq_len:] = 1
    for b in range(batch):
        pos = np.sort(rng.choice(seq_len, size=n_data, replace=False))
        sym = rng.integers(2, n_symbols + 2, size=n_data)
        x[b, pos] = sym
        y[b, seq_len:] = sym
    return x, y


def induction_heads(rng: np.random.Generator, batch: int, seq_len: int, n_symbols: int):
    """inputs (B, seq_len) and targets (IGNORE except the last position: the symbol after the first trigger).

    Ids: 0 the trigger, 1 .. n_symbols the symbols. Vocabulary size n_symbols + 1.
    """
    x = rng.integers(1, n_symbols + 1, size=(batch, seq_len))
    y = np.full_like(x, IGNORE)
    at = rng.integers(0, seq_len - 2, size=batch)  # the first trigger; its symbol comes before the final trigger
    rows = np.arange(batch)
    x[rows, at] = 0
    x[:, -1] = 0
    y[:, -1] = x[rows, at + 1]
    return x, y


def _batch(task: str, cfg: SynthConfig, rng: np.random.Generator, batch: int, length: int | None = None):
    if task == "selective_copying":
        return selective_copying(rng, batch, cfg.seq_len, cfg.n_data, cfg.n_symbols)
    return induction_heads(rng, batch, length or cfg.induction_len, cfg.n_symbols)


def _vocab(task: str, cfg: SynthConfig) -> int:
    return cfg.n_symbols + (2 if task == "selective_copying" else 1)


def _accuracy(model, task: str, cfg: SynthConfig, length: int | None) -> float:
    import torch

    rng = np.random.default_rng(cfg.seed + 1_000_003)  # the test stream, apart from training's
    right = total = 0
    for start in range(0, cfg.eval_examples, 256):
        x, y = _batch(task, cfg, rng, min(256, cfg.eval_examples - start), length)
        with torch.no_grad():
            pred = model(torch.as_tensor(x)).argmax(-1).numpy()
        mask = y != IGNORE
        right += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
    return right / total


def train_one(task: str, arch: str, cfg: SynthConfig) -> dict:
    """Train ``arch`` (a key of ARCHS) on ``task`` and measure its accuracy; returns a result row."""
    import torch

    from sokhan.pipeline.models import ModelConfig, build

    kind, selective = ARCHS[arch]
    longest = max(cfg.test_lengths) if task == "induction_heads" else cfg.seq_len + cfg.n_data
    mcfg = ModelConfig(arch=kind, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads if kind == "transformer" else None,
                       selective=selective, max_seq_len=max(longest, 16), vocab_size=_vocab(task, cfg)).resolve()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        return _train(task, arch, cfg, build(mcfg))
    finally:
        torch.set_num_threads(threads)


def _train(task: str, arch: str, cfg: SynthConfig, model) -> dict:
    """AdamW with a one-cycle schedule on fresh batches; loss on the answer positions only."""
    import torch
    import torch.nn.functional as F

    from sokhan.pipeline.stage import log

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    model.train()
    loss = float("nan")
    every = math.ceil(cfg.steps / LOG_LINES)  # every tenth of the run, and the last step
    for step in range(1, cfg.steps + 1):
        x, y = _batch(task, cfg, rng, cfg.batch_size)
        logits = model(torch.as_tensor(x))
        out = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(y).reshape(-1), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = out.item()
        if step % every == 0 or step == cfg.steps:
            log(f"synth: {task} {arch} step {step}/{cfg.steps} loss {loss:.3f}")
    model.eval()
    row = {"task": task, "arch": arch, "parameters": sum(p.numel() for p in model.parameters()),
           "final_loss": loss, "train_s": round(time.time() - t0, 1)}
    if task == "selective_copying":
        row["accuracy"] = _accuracy(model, task, cfg, None)
    else:
        row["accuracy"] = {str(n): _accuracy(model, task, cfg, n) for n in cfg.test_lengths}
    return row


def markdown(results: list[dict], cfg: SynthConfig) -> str:
    lines = []
    copy = [r for r in results if r["task"] == "selective_copying"]
    if copy:
        lines += [f"Selective copying ({cfg.n_data} of {cfg.n_symbols} symbols in {cfg.seq_len} tokens; {cfg.steps} steps, "
                  f"batch {cfg.batch_size}, d_model {cfg.d_model}, {cfg.n_layers} layers):", "",
                  "| model | params | accuracy | final loss | train s |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['arch']} | {r['parameters']:,} | {100 * r['accuracy']:.1f}% | {r['final_loss']:.3f} | {r['train_s']} |" for r in copy]
        lines.append("")
    ind = [r for r in results if r["task"] == "induction_heads"]
    if ind:
        lengths = list(ind[0]["accuracy"])
        lines += [f"Induction heads ({cfg.n_symbols} symbols, trained at length {cfg.induction_len}, {cfg.steps} steps; "
                  "accuracy by test length):", "",
                  "| model | params | " + " | ".join(f"L={n}" for n in lengths) + " |",
                  "|---|---:|" + "---:|" * len(lengths)]
        lines += [f"| {r['arch']} | {r['parameters']:,} | " + " | ".join(f"{100 * r['accuracy'][n]:.1f}%" for n in lengths) + " |" for r in ind]
        lines.append("")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    d = SynthConfig()
    parser.add_argument("--task", choices=(*TASKS, "all"), default="all", help="which task (default: both)")
    parser.add_argument("--arch", default=",".join(ARCHS), help=f"comma-separated subset of {', '.join(ARCHS)} (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/synth"), help="folder for synth.json and synth.md, replaced by each run (default: runs/synth)")
    parser.add_argument("--steps", type=int, default=d.steps, help="training steps per model and task (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=d.seq_len, help="selective copying: length of the region holding the symbols (default: %(default)s)")
    parser.add_argument("--n-data", type=int, default=d.n_data, help="selective copying: symbols to copy (default: %(default)s)")
    parser.add_argument("--n-symbols", type=int, default=d.n_symbols, help="alphabet size of both tasks (default: %(default)s)")
    parser.add_argument("--induction-len", type=int, default=d.induction_len, help="induction heads training length (default: %(default)s)")
    parser.add_argument("--test-lengths", default=",".join(map(str, d.test_lengths)), help="induction heads test lengths (default: %(default)s)")
    parser.add_argument("--d-model", type=int, default=d.d_model, help="model width (default: %(default)s)")
    parser.add_argument("--n-layers", type=int, default=d.n_layers, help="model depth (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--eval-examples", type=int, default=d.eval_examples, help="held-out sequences scored per model (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the data and the initialisation (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    from sokhan.pipeline.stage import atomic_write, ensure_dir, log, write_json

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs:
        raise SokhanError(f"--arch {args.arch!r}: choose from {', '.join(ARCHS)}")
    try:
        lengths = [int(n) for n in args.test_lengths.split(",") if n.strip()]
    except ValueError:
        raise SokhanError(f"--test-lengths {args.test_lengths!r}: expected comma-separated integers") from None
    cfg = SynthConfig(seq_len=args.seq_len, n_data=args.n_data, n_symbols=args.n_symbols, induction_len=args.induction_len,
                      test_lengths=lengths or [args.induction_len],
                      d_model=args.d_model, n_layers=args.n_layers, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, eval_examples=args.eval_examples,
                      seed=args.seed, threads=args.threads)
    ensure_dir(args.out, "--out")  # before the training, not after it: a bad folder would lose the results
    tasks = TASKS if args.task == "all" else (args.task,)
    results = []
    for task in tasks:
        for arch in archs:
            log(f"synth: {task} with {arch}, {cfg.steps} steps")
            results.append(train_one(task, arch, cfg))
            log(f"synth: {task} {arch}: accuracy {json.dumps(results[-1]['accuracy'])}")
    write_json(args.out / "synth.json", {"config": asdict(cfg), "results": results})
    table = markdown(results, cfg)
    atomic_write(args.out / "synth.md", table)
    log(f"synth: wrote {args.out / 'synth.json'} and {args.out / 'synth.md'}")
    print(table)
    return 0
