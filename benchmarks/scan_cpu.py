"""The CPU selective scans against the sequential reference: forward and forward + backward time.

Three paths, timed in the same process one after the other: the reference (one Python step per time step), the
compiled C++ scan (the ``cpu`` backend on CPU tensors) and the chunked PyTorch scan (its fallback without a
compiler). Inputs look like one layer of the ``tiny`` Mamba (D_inner = 256, N = 16) at batch 2: A = -(1..N) (S4D-real
init), Δ = softplus(0.5 · randn + Δ_bias) with Δ_bias the inverse softplus of a log-uniform draw in [0.001, 0.1], z
and D on. The chunk length the chunked path can use depends on the largest decay |Δ A| per step (it keeps exp
factors in float32 range), so the table gives the number of chunks too. The first line printed is the time
:func:`~sokhan.kernels.selective_scan.compiled.load` took (a build when the cache is empty).

    python benchmarks/scan_cpu.py                       # one thread, L = 256, 1024, 2048
    python benchmarks/scan_cpu.py --threads 2 --lengths 1024

Writes ``benchmarks/out/scan_cpu.json`` and prints a markdown table. The claim checked: the ``cpu`` backend is at
least 10× faster than the sequential reference at L = 1024.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from bench_cli import positive, run

from sokhan.kernels.selective_scan import compiled, selective_scan_chunked, selective_scan_compiled, selective_scan_ref
from sokhan.kernels.selective_scan.chunked import _MAX_LOG_DECAY, chunk_bounds
from sokhan.kernels.selective_scan.reference import discretize_delta
from sokhan.pipeline.stage import write_json

OUT = Path(__file__).parent / "out" / "scan_cpu.json"


def mamba_like_inputs(batch: int, dim: int, N: int, L: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        "u": torch.randn(batch, dim, L, generator=g),
        "delta": 0.5 * torch.randn(batch, dim, L, generator=g),
        "A": -torch.arange(1, N + 1, dtype=torch.float32).repeat(dim, 1),
        "B": torch.randn(batch, N, L, generator=g),
        "C": torch.randn(batch, N, L, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, L, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus
    }


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(scan, inputs: dict[str, torch.Tensor], backward: bool, repeats: int) -> float:
    leaves = {k: v.clone().requires_grad_(backward) for k, v in inputs.items()}

    def once():
        out = scan(**leaves, delta_softplus=True)
        if backward:
            out.sum().backward()

    once()  # warm-up: allocator, thread pool
    return best_time(once, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive, default=2)
    parser.add_argument("--dim", type=positive, default=256)
    parser.add_argument("--dstate", type=positive, default=16)
    parser.add_argument("--lengths", type=positive, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--threads", type=positive, default=1)
    parser.add_argument("--repeats", type=positive, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if compiled.load() is None:
        raise SystemExit("the compiled scan could not be built (see the warning above)")
    load_s = time.perf_counter() - t0
    print(f"compiled scan loaded in {load_s:.2f} s", flush=True)

    paths = {"reference": selective_scan_ref, "compiled": selective_scan_compiled, "chunked": selective_scan_chunked}
    rows = []
    for L in args.lengths:
        inputs = mamba_like_inputs(args.batch, args.dim, args.dstate, L)
        with torch.no_grad():
            delta = discretize_delta(inputs["delta"], inputs["delta_bias"], True, torch.float32)
            chunks = len(chunk_bounds(delta, inputs["A"], 64, _MAX_LOG_DECAY[torch.float32]))
        row = {"L": L, "chunks": chunks}
        for mode, backward in (("fwd", False), ("fwd_bwd", True)):
            for name, scan in paths.items():
                row[f"{mode}_{name}_s"] = measure(scan, inputs, backward, args.repeats)
            for name in ("compiled", "chunked"):
                row[f"{mode}_{name}_speedup"] = row[f"{mode}_reference_s"] / row[f"{mode}_{name}_s"]
        rows.append(row)
        speedups = ", ".join(f"{k.removesuffix('_speedup')} {v:.1f}x" for k, v in row.items() if k.endswith("speedup"))
        print(f"L={L}: {speedups}", flush=True)

    result = {
        "shape": {"batch": args.batch, "dim": args.dim, "dstate": args.dstate},
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "compiled_load_s": load_s,
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_json(OUT, result)
    print(f"\nbatch {args.batch}, D {args.dim}, N {args.dstate}, {args.threads} thread(s), best of {args.repeats}\n")
    print("| L | chunks | pass | reference (ms) | compiled (ms) | speedup | chunked (ms) | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for mode, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
            print(
                f"| {r['L']} | {r['chunks']} | {label} | {1e3 * r[f'{mode}_reference_s']:.1f} "
                f"| {1e3 * r[f'{mode}_compiled_s']:.1f} | {r[f'{mode}_compiled_speedup']:.1f}× "
                f"| {1e3 * r[f'{mode}_chunked_s']:.1f} | {r[f'{mode}_chunked_speedup']:.1f}× |"
            )


if __name__ == "__main__":
    run(main)
