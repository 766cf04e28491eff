"""Training throughput of the transformer and Mamba at equal parameter count: step time and tokens/s.

One step is what the train stage does per optimizer step: forward, cross-entropy, backward, gradient clipping and
AdamW. The transformer is the ``tiny`` preset; Mamba gets the same width and the number of layers whose
non-embedding parameter count is closest to the transformer's (embeddings are the same table in both).

    python benchmarks/train.py                      # CPU, L = 256, batch 8, one thread
    python benchmarks/train.py --device cuda --batch-size 32

Each model is timed twice: with the loss as training computes it (``model(x, targets=y)``: the output projection and
cross-entropy fused by ``linear_cross_entropy``, chunked on CPU) and as before that existed (the (B·L, V) logits,
then ``cross_entropy`` on them). Writes ``benchmarks/out/train.json`` and prints a markdown table. The claim
checked: Mamba's step time is at most 1.5× the transformer's on CPU at L = 256.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bench_cli import positive, run

from sokhan.kernels import cross_entropy, dispatch
from sokhan.pipeline.models import ModelConfig, build
from sokhan.pipeline.train.loop import lm_loss
from sokhan.pipeline.train.optim import build_optimizer

OUT = Path(__file__).parent / "out" / "train.json"


def non_embedding_params(model: torch.nn.Module) -> int:
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not emb)


def matched_configs(vocab: int, seq_len: int, d_model: int) -> tuple[ModelConfig, ModelConfig]:
    """The transformer ``tiny`` preset at ``d_model`` and the Mamba of that width closest to it in parameters."""
    tcfg = ModelConfig(arch="transformer", preset="tiny", d_model=d_model, max_seq_len=seq_len).resolve(vocab)
    with torch.device("meta"):
        target = non_embedding_params(build(tcfg))
        best = min(
            (ModelConfig(arch="mamba", preset="tiny", d_model=d_model, n_layers=n).resolve(vocab) for n in range(1, 17)),
            key=lambda c: abs(non_embedding_params(build(c)) - target),
        )
    return tcfg, best


def logits_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss through the full logits: the training loop's path before ``linear_cross_entropy``."""
    logits = model(x)
    return cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


LOSSES = {"fused": lm_loss, "logits": logits_loss}


def time_steps(
    cfg: ModelConfig, loss_name: str, batch_size: int, seq_len: int, steps: int, warmup: int, device: torch.device
) -> dict:
    torch.manual_seed(0)
    model = build(cfg).to(device).train()
    opt = build_optimizer(model, 1e-3, 0.1)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    times, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast:
            loss = LOSSES[loss_name](model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    step = statistics.median(times)
    return {
        "arch": cfg.arch,
        "loss": loss_name,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "non_embedding_parameters": non_embedding_params(model),
        "step_time_ms": 1000 * step,
        "step_time_ms_min": 1000 * min(times),
        # CPU seconds of this process per step: on a shared machine, less inflated by other processes than wall time.
        "cpu_time_ms": 1000 * statistics.median(cpu),
        "tokens_per_s": batch_size * seq_len / step,
        "final_loss": loss.item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--seq-len", type=positive, default=256)
    ap.add_argument("--batch-size", type=positive, default=8)
    ap.add_argument("--d-model", type=positive, default=128)
    ap.add_argument("--vocab", type=positive, default=8000)
    ap.add_argument("--steps", type=positive, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=positive, default=1, help="torch intra-op threads on CPU (default 1)")
    ap.add_argument("--kernels", default="auto", choices=("auto", "triton", "reference", "cpu"),
                    help="SOKHAN_KERNELS backend for the Mamba scan")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this PyTorch sees no GPU")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    with dispatch.use(args.kernels):
        for cfg in matched_configs(args.vocab, args.seq_len, args.d_model):
            for loss_name in LOSSES:
                rows.append(time_steps(cfg, loss_name, args.batch_size, args.seq_len, args.steps, args.warmup, device))
    step = {(r["arch"], r["loss"]): r["step_time_ms"] for r in rows}
    ratio = step["mamba", "fused"] / step["transformer", "fused"]
    fused_speedup = {arch: step[arch, "logits"] / step[arch, "fused"] for arch in ("transformer", "mamba")}
    result = {
        "settings": {**vars(args), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                     "threads": torch.get_num_threads()},
        "results": rows,
        "mamba_over_transformer_step_time": ratio,
        "fused_loss_speedup": fused_speedup,
        "target": "mamba step time <= 1.5x transformer (CPU, L = 256)",
        "target_met": ratio <= 1.5,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")

    print(f"device {args.device}, L = {args.seq_len}, batch {args.batch_size}, vocab {args.vocab}, "
          f"{torch.get_num_threads()} thread(s), kernels {args.kernels}\n")
    print("| arch | d_model | layers | params (non-emb) | loss | step (ms, median) | CPU time / step (ms) | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['d_model']} | {r['n_layers']} | {r['parameters'] / 1e6:.2f}M ({r['non_embedding_parameters'] / 1e6:.2f}M) "
              f"| {r['loss']} | {r['step_time_ms']:.1f} | {r['cpu_time_ms']:.1f} | {r['tokens_per_s']:.0f} |")
    print(f"\nMamba / transformer step time (fused loss): {ratio:.2f}x (target ≤ 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
    print("Fused loss over logits + cross_entropy: " + ", ".join(f"{a} {v:.2f}x" for a, v in fused_speedup.items()))


if __name__ == "__main__":
    run(main)
