"""Every kernel against its PyTorch reference: time and bandwidth on a GPU, agreement under the interpreter on CPU.

On CUDA: for L = 256 … 8192, forward and forward + backward time of each op's Triton kernel and its reference
(``scaled_dot_product_attention`` for attention: that is its reference), with GB/s for the memory-bound ops (bytes
each op must move at least once, over the kernel's time, and the share of the card's DRAM bandwidth where the card
is known) and TFLOP/s for attention. Writes ``benchmarks/out/kernels.json`` and ``benchmarks/out/kernels.png``.
Targets: selective scan forward ≥ 20× its reference at L = 2048 and ≥ 60% of DRAM bandwidth; flash attention within
1.2× of SDPA.

Without CUDA the kernels run in Triton's interpreter, far too slow to time: the script reports, per op, the largest
relative RMS error of the float32 Triton kernel's outputs and gradients against the reference run in float64, on
small shapes (``benchmarks/out/kernels_agreement.json``).

    python benchmarks/kernels.py                 # GPU: timings; CPU: agreement
    python benchmarks/kernels.py --lengths 1024 2048 --ops selective_scan flash_attention
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():
    # Triton decides interpreted vs compiled when a kernel is defined: set before any kernel module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench_cli import positive, run  # noqa: E402

from sokhan.kernels import (  # noqa: E402
    causal_conv1d,
    causal_conv1d_update,
    dispatch,
    flash_attention,
    rms_norm,
    selective_scan,
    selective_state_update,
)
from sokhan.kernels.cross_entropy import cross_entropy  # noqa: E402
from sokhan.pipeline.stage import write_json  # noqa: E402

OUT = Path(__file__).parent / "out"
# Peak DRAM bandwidth (GB/s) by the name torch reports, for the "% of DRAM" column.
PEAK_GBPS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555}


@dataclass
class Case:
    """One op at one size: ``inputs`` (float leaves get gradients), ``call(backend, **inputs)``, and its cost."""

    inputs: dict[str, torch.Tensor | None]
    call: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    bytes: float = 0.0  # the least memory traffic of the forward
    flops: float = 0.0
    backward: bool = True


def _randn(*shape, device, dtype, scale=1.0):
    return scale * torch.randn(*shape, device=device, dtype=dtype)


def scan_case(L, device, dtype, batch=2, dim=1536, N=16):
    r = lambda *s, **k: _randn(*s, device=device, dtype=dtype, **k)  # noqa: E731
    inputs = {
        "u": r(batch, dim, L), "delta": r(batch, dim, L, scale=0.5), "A": -torch.rand(dim, N, device=device).to(dtype),
        "B": r(batch, N, L), "C": r(batch, N, L), "D": r(dim), "z": r(batch, dim, L), "delta_bias": r(dim, scale=0.1),
    }
    size = torch.finfo(dtype).bits // 8
    return Case(inputs, lambda backend, **a: selective_scan(**a, delta_softplus=True, backend=backend),
                bytes=size * (4 * batch * dim * L + 2 * batch * N * L))


def state_update_case(L, device, dtype, batch=None, dim=1536, N=16):
    batch = batch or max(1, L // 64)  # decode batch grows with the column so the table has a range of sizes
    r = lambda *s, **k: _randn(*s, device=device, dtype=dtype, **k)  # noqa: E731
    inputs = {
        "state": r(batch, dim, N), "x": r(batch, dim), "dt": r(batch, dim),
        "A": -torch.rand(dim, N, device=device).to(dtype),
        "B": r(batch, N), "C": r(batch, N), "D": r(dim), "z": r(batch, dim), "dt_bias": r(dim, scale=0.1),
    }
    size = torch.finfo(dtype).bits // 8
    # The state is updated in place: it is an output as much as y (the agreement check compares both).
    return Case(inputs, lambda backend, **a: (selective_state_update(**a, dt_softplus=True, backend=backend), a["state"]),
                bytes=size * (2 * batch * dim * N + 4 * batch * dim), backward=False)


def conv_case(L, device, dtype, batch=2, dim=1536, W=4):
    r = lambda *s, **k: _randn(*s, device=device, dtype=dtype, **k)  # noqa: E731
    inputs = {"x": r(batch, dim, L), "weight": r(dim, W, scale=0.5), "bias": r(dim)}
    size = torch.finfo(dtype).bits // 8
    return Case(inputs, lambda backend, **a: causal_conv1d(**a, activation="silu", backend=backend),
                bytes=size * 2 * batch * dim * L)


def conv_update_case(L, device, dtype, batch=None, dim=1536, W=4):
    batch = batch or max(1, L // 64)
    r = lambda *s, **k: _randn(*s, device=device, dtype=dtype, **k)  # noqa: E731
    inputs = {"x": r(batch, dim), "conv_state": r(batch, dim, W), "weight": r(dim, W, scale=0.5), "bias": r(dim)}
    size = torch.finfo(dtype).bits // 8
    return Case(inputs, lambda backend, **a: (causal_conv1d_update(**a, activation="silu", backend=backend), a["conv_state"]),
                bytes=size * batch * dim * (2 * W + 2), backward=False)


def rms_case(L, device, dtype, batch=2, d_model=2048):
    r = lambda *s, **k: _randn(*s, device=device, dtype=dtype, **k)  # noqa: E731
    inputs = {"x": r(batch, L, d_model), "weight": 1 + r(d_model, scale=0.1), "residual": r(batch, L, d_model)}
    size = torch.finfo(dtype).bits // 8
    return Case(inputs, lambda backend, **a: rms_norm(**a, prenorm=True, backend=backend),
                bytes=size * 4 * batch * L * d_model)


def attention_case(L, device, dtype, batch=2, heads=16, hd=64):
    r = lambda *s, **k: _randn(*s, device=device, dtype=dtype, **k)  # noqa: E731
    inputs = {"q": r(batch, heads, L, hd), "k": r(batch, heads, L, hd), "v": r(batch, heads, L, hd)}
    return Case(inputs, lambda backend, **a: flash_attention(**a, causal=True, backend=backend),
                flops=2 * 2 * batch * heads * L * L * hd / 2)  # two matmuls, half the square under the causal mask


def cross_entropy_case(L, device, dtype, batch=2, vocab=32768):
    inputs = {"logits": _randn(batch * L, vocab, device=device, dtype=dtype),
              "targets": torch.randint(0, vocab, (batch * L,), device=device)}
    size = torch.finfo(dtype).bits // 8
    return Case(inputs, lambda backend, **a: cross_entropy(**a, backend=backend), bytes=size * batch * L * vocab)


OPS = {
    "selective_scan": scan_case,
    "selective_state_update": state_update_case,
    "causal_conv1d": conv_case,
    "causal_conv1d_update": conv_update_case,
    "rms_norm": rms_case,
    "flash_attention": attention_case,
    "cross_entropy": cross_entropy_case,
}
# Shapes small enough for the interpreter: a length for each op's agreement check.
AGREEMENT_L = {"selective_scan": 37, "causal_conv1d": 37, "rms_norm": 9, "flash_attention": 37, "cross_entropy": 3}
AGREEMENT_SIZES = {
    "selective_scan": dict(batch=1, dim=6, N=4),
    "selective_state_update": dict(batch=2, dim=6, N=4),
    "causal_conv1d": dict(batch=1, dim=6),
    "causal_conv1d_update": dict(batch=2, dim=6),
    "rms_norm": dict(batch=1, d_model=40),
    "flash_attention": dict(batch=1, heads=2, hd=16),
    "cross_entropy": dict(batch=2, vocab=300),
}


def outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def make_leaves(inputs: dict, backward: bool) -> dict:
    """Fresh copies of the inputs; float ones require grad when the backward is wanted."""
    return {k: v.detach().clone().requires_grad_(backward and v.is_floating_point()) if v is not None else None
            for k, v in inputs.items()}


def projection(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fixed random weights to reduce outputs to a loss; drawn in float64 and cast, so runs in float32 and float64
    project onto the same weights."""
    g = torch.Generator(device=outs[0].device).manual_seed(0)
    return [torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float64).to(o.dtype) for o in outs]


def run_once(case: Case, leaves: dict, backend: str, weights: list[torch.Tensor] | None):
    """Outputs, and with ``weights`` the gradients of sum(outputs · weights) w.r.t. every leaf that requires grad."""
    outs = outputs(case.call(backend, **leaves))
    if weights is None:
        return outs, []
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return outs, list(torch.autograd.grad(loss, [v for v in leaves.values() if v is not None and v.requires_grad]))


def forward_backward(case: Case, inputs: dict, backend: str, backward: bool):
    leaves = make_leaves(inputs, backward)
    if not backward:
        return run_once(case, leaves, backend, None)
    with torch.no_grad():
        weights = projection(outputs(case.call(backend, **make_leaves(inputs, False))))
    return run_once(case, leaves, backend, weights)


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt()
    scale = expected.double().pow(2).mean().sqrt()
    return (diff / scale if scale > 0 else diff).item()


def agreement(ops: list[str]) -> None:
    """CPU: the interpreted float32 kernels against the float64 reference, largest relative RMS error per op."""
    torch.manual_seed(0)
    rows = []
    for op in ops:
        case = OPS[op](AGREEMENT_L.get(op, 1), "cpu", torch.float64, **AGREEMENT_SIZES[op])
        t0 = time.perf_counter()
        with torch.no_grad() if not case.backward else torch.enable_grad():
            ref_outs, ref_grads = forward_backward(case, case.inputs, "reference", case.backward)
            f32 = {k: v.float() if v is not None and v.is_floating_point() else v for k, v in case.inputs.items()}
            outs, grads = forward_backward(case, f32, "triton", case.backward)
        errors = [rel_rms(a, e) for a, e in zip(outs + grads, ref_outs + ref_grads)]
        rows.append({"op": op, "max_rel_rms_error": max(errors), "tensors_compared": len(errors),
                     "seconds": time.perf_counter() - t0})
        print(f"{op}: {max(errors):.2e} over {len(errors)} tensors", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"device": "cpu (Triton interpreter)", "torch": torch.__version__, "rows": rows}
    write_json(OUT / "kernels_agreement.json", result)
    print("\nTriton (float32, interpreted) against the reference in float64; outputs and every input gradient\n")
    print("| op | max relative RMS error | tensors compared |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['max_rel_rms_error']:.1e} | {r['tensors_compared']} |")


def timings(ops: list[str], lengths: list[int], dtype: torch.dtype, ref_max_len: int) -> None:
    """CUDA: time and throughput of each op's Triton kernel and its reference."""
    from triton.testing import do_bench

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBPS.items() if k in name), None)
    torch.manual_seed(0)
    rows = []
    for op in ops:
        for L in lengths:
            case = OPS[op](L, "cuda", dtype)
            row = {"op": op, "L": L}
            for backend in ("triton", "reference"):
                if backend == "reference" and L > ref_max_len:
                    continue
                modes = [("fwd", False)] + ([("fwd_bwd", True)] if case.backward else [])
                for mode, backward in modes:
                    try:
                        # Inputs and loss weights are made once, outside the timed call.
                        leaves = make_leaves(case.inputs, backward)
                        with torch.no_grad():
                            weights = projection(outputs(case.call(backend, **make_leaves(case.inputs, False))))
                        with torch.no_grad() if not backward else torch.enable_grad():
                            ms = do_bench(lambda: run_once(case, leaves, backend, weights if backward else None),
                                          warmup=5, rep=50)
                    except torch.cuda.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        row[f"{mode}_{backend}_ms"] = None
                        continue
                    row[f"{mode}_{backend}_ms"] = ms
            fwd = row.get("fwd_triton_ms")
            if fwd and case.bytes:
                row["fwd_triton_GBps"] = case.bytes / fwd / 1e6
                if peak:
                    row["fwd_triton_dram_pct"] = 100 * row["fwd_triton_GBps"] / peak
            if fwd and case.flops:
                row["fwd_triton_TFLOPs"] = case.flops / fwd / 1e9
            if fwd and row.get("fwd_reference_ms"):
                row["fwd_speedup"] = row["fwd_reference_ms"] / fwd
            rows.append(row)
            print(op, L, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)}, flush=True)
            del case
            torch.cuda.empty_cache()
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "kernels.json", {"device": name, "dtype": str(dtype), "torch": torch.__version__,
                                      "peak_dram_GBps": peak, "rows": rows})
    plot(rows, name)
    print(f"\n{name}, {dtype}; times in ms (triton.testing.do_bench); reference = PyTorch (SDPA for attention)\n")
    print("| op | L | fwd Triton | fwd reference | speedup | GB/s | % DRAM | TFLOP/s | fwd+bwd Triton "
          "| fwd+bwd reference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f="{:.3f}": "—" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        print(f"| {r['op']} | {r['L']} | {fmt(r.get('fwd_triton_ms'))} | {fmt(r.get('fwd_reference_ms'))} | "
              f"{fmt(r.get('fwd_speedup'), '{:.1f}×')} | {fmt(r.get('fwd_triton_GBps'), '{:.0f}')} | "
              f"{fmt(r.get('fwd_triton_dram_pct'), '{:.0f}%')} | {fmt(r.get('fwd_triton_TFLOPs'), '{:.1f}')} | "
              f"{fmt(r.get('fwd_bwd_triton_ms'))} | {fmt(r.get('fwd_bwd_reference_ms'))} |")


def plot(rows: list[dict], device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sokhan.pipeline.plotting import save

    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(ops), figsize=(4 * len(ops), 3.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        mine = [r for r in rows if r["op"] == op]
        for key, style in (("fwd_triton_ms", "-o"), ("fwd_reference_ms", "--o"), ("fwd_bwd_triton_ms", "-s"),
                           ("fwd_bwd_reference_ms", "--s")):
            pts = [(r["L"], r[key]) for r in mine if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), style, label=key.replace("_ms", "").replace("_", " "))
        ax.set(title=op, xscale="log", yscale="log", xlabel="L", ylabel="ms")
        ax.legend(fontsize=7)
    fig.suptitle(device)
    fig.tight_layout()
    save(fig, OUT / "kernels.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    parser.add_argument("--lengths", type=positive, nargs="+", default=None,
                        help="GPU: sequence lengths to time (default 256 … 8192)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="GPU: input dtype (default float32)")
    parser.add_argument("--ref-max-len", type=positive, default=None, help="GPU: skip the (slow) references above this L (default 8192)")
    args = parser.parse_args()
    timing_flags = [f for f, v in (("--lengths", args.lengths), ("--dtype", args.dtype), ("--ref-max-len", args.ref_max_len)) if v]
    if torch.cuda.is_available() and not dispatch.interpreting():
        timings(args.ops, args.lengths or [256, 512, 1024, 2048, 4096, 8192], getattr(torch, args.dtype or "float32"),
                args.ref_max_len or 8192)
    elif timing_flags:
        parser.error(f"{', '.join(timing_flags)}: timing needs a GPU; without one this script checks agreement only")
    else:
        agreement(args.ops)


if __name__ == "__main__":
    run(main)
