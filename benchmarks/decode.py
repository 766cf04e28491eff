"""Per-token decode latency against context length: Mamba vs transformer, ONNX Runtime vs PyTorch eager.

    python benchmarks/decode.py                      # contexts 16..4096, 1 thread, CPU
    python benchmarks/decode.py --contexts 16 64 256 --threads 2
    python benchmarks/decode.py --prefill-only       # Mamba prompt consumption only (prompts 64, 256, 1024)

Five ways to produce the next token at batch 1 after ``context`` tokens, with untrained ``tiny`` preset models
(vocabulary 8000, as the default tokenizer):

- ``mamba_onnx``: the exported Mamba step (``decoder.onnx``) through the runtime's step API (``StepGraph.step``:
  the input state kept, a new one allocated), and ``mamba_onnx_loop`` through ``StepLoop``, the in-place loop
  ``Decoder.generate`` uses;
- ``mamba_eager``: PyTorch ``MambaLM.step`` (default kernel dispatch);
- ``transformer_onnx``: the exported transformer step with a KV cache of ``context`` entries, through the step API
  (the cache copied into a new ``present``), and ``transformer_onnx_loop`` through ``CacheLoop``, the loop
  ``Decoder.generate`` uses: one buffer per cache bound as past and present, appended in place;
- ``transformer_eager``: PyTorch ``Transformer.step`` on its preallocated KV cache at position ``context``;
- ``transformer_nocache_onnx`` / ``_eager``: no cache, the whole ``context + 1`` tokens recomputed for one token
  (the prefill graph / ``forward``): the quadratic cost a cache avoids.
- ``*_onnx_int8`` / ``*_onnx_int8_loop``: the bundle's ``--quantize int8`` graph, both ways.

And a roofline: at batch 1 a step reads every weight once and its whole state (the cache of ``context`` entries),
so no graph can take less than reading those bytes takes. ``read_ms`` times that on this machine (summing an array
of the same size), and the table beside it says how close each loop comes and how far ahead of eager any graph
reading that many bytes could be.

And the time to consume a prompt of ``--prompts`` tokens from an empty state with the exported Mamba: one call of
``prefill.onnx`` (parallel over the prompt, one ONNX ``Scan`` per layer for the recurrence) against ``decoder.onnx``
token by token, both the runtime's IOBinding path, batch 1 (written to ``benchmarks/out/prefill.json``).

The state's values do not change the work of these dense ops, so each measurement starts from a random state of
the right shape (a cache of ``context`` entries) instead of decoding ``context`` tokens first. Each figure is the
median of ``--reps`` timed calls after warm-up. Writes ``benchmarks/out/decode.json`` and ``decode.png`` and prints
a markdown table. Both runtimes get the same thread count.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_cli import positive, run

from sokhan.export.onnx import export_decoder, state_layout
from sokhan.export.prefill import export_prefill
from sokhan.export.quantize import to_int8
from sokhan.export.runtime import CacheLoop, StepGraph, StepLoop, graph_dtypes, open_session, state_specs
from sokhan.pipeline.models import ModelConfig, build
from sokhan.pipeline.stage import write_json

OUT = Path(__file__).resolve().parent / "out"
VOCAB = 8000


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def reps_for(context: int, base: int, quadratic: bool) -> int:
    return max(3, base // (1 + context // 256)) if quadratic else base


def random_state(cfg: ModelConfig, context: int, rng: np.random.Generator) -> list[np.ndarray]:
    shapes = [[1 if d == "batch" else context if d == "past" else d for d in s["shape"]] for s in state_layout(cfg)]
    return [rng.standard_normal(s).astype(np.float32) * 0.1 for s in shapes]


def weight_bytes(path: Path) -> int:
    """Bytes of weights one step reads: every initializer, except a table a step reads one row of (the embedding,
    gathered; the rotary cos/sin tables, which ``GroupQueryAttention`` indexes at the token's position)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path)).graph
    gathered, used = set(), set()
    for node in graph.node:
        rows = {0} if node.op_type == "Gather" else {7, 8} if node.op_type == "GroupQueryAttention" else set()
        for i, name in enumerate(node.input):
            (gathered if i in rows else used).add(name)
    return sum(int(np.prod(t.dims)) * tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in graph.initializer if t.name in used or t.name not in gathered)


def state_bytes(graph: StepGraph, cfg: ModelConfig, context: int) -> int:
    """Bytes of state one step reads at batch 1: the whole recurrent state, or the cache of ``context`` entries,
    in the graph's own state dtypes (the int8 transformer's cache is int8)."""
    shapes = [[1 if d == "batch" else context if d == "past" else d for d in s["shape"]] for s in state_layout(cfg)]
    return sum(int(np.prod(s)) * np.dtype(spec.dtype).itemsize for s, spec in zip(shapes, graph.specs))


def read_ms(nbytes: int, reps: int = 50) -> float:
    """The time to read ``nbytes`` once at this machine's streaming rate: summing a float32 array of that size,
    already warm (where a decode step's weights and cache sit between steps). A step that reads that many bytes
    cannot take less, whatever it computes."""
    x = torch.ones(max(1, nbytes // 4))
    return median_ms(lambda: x.sum(), reps)


def bench_graph(name: str, cfg: ModelConfig, graph: StepGraph, contexts: list[int], reps: int, rng) -> dict:
    """ms per token of one step graph at each context, from a random state: ``name`` through the step API and
    ``name_loop`` through the in-place loop ``Decoder.generate`` uses (``CacheLoop`` for a cache the graph appends
    to in place, ``StepLoop`` otherwise)."""
    out: dict[str, dict[int, float]] = {name: {}, f"{name}_loop": {}}
    token = np.array([7])
    for c in contexts:
        arrays = [a.astype(spec.dtype) for a, spec in zip(random_state(cfg, c, rng), graph.specs)]
        state = graph.state_from_numpy(arrays, position=c)
        out[name][c] = median_ms(lambda: graph.step(token, state), reps)
        if cfg.arch == "transformer":
            loop = CacheLoop(graph, state, capacity=cfg.max_seq_len)

            def loop_step():
                loop.position = c  # as eager: every call decodes the token at position c
                loop.step(token)
        else:
            loop = StepLoop(graph, state)  # the state updated in place
            loop_step = lambda: loop.step(token)  # noqa: E731
        out[f"{name}_loop"][c] = median_ms(loop_step, reps)
    return out


def bench_mamba_eager(cfg: ModelConfig, model, contexts: list[int], reps: int, rng) -> dict:
    out: dict[str, dict[int, float]] = {"mamba_eager": {}}
    for c in contexts:
        tstate = model.init_state(1)
        for t, a in zip(tstate.tensors(), random_state(cfg, c, rng)):
            t.copy_(torch.from_numpy(a))
        ids = torch.tensor([7])
        with torch.no_grad():
            out["mamba_eager"][c] = median_ms(lambda: model.step(ids, tstate), reps)
    return out


def bench_mamba_prefill(prefill, graph: StepGraph, prompts: list[int], reps: int, rng) -> dict:
    """ms to consume a prompt of T tokens from an empty state: prefill.onnx in one call vs decoder.onnx per token."""
    out: dict[str, dict[int, float]] = {"mamba_prefill_onnx": {}, "mamba_stepped_onnx": {}}
    outputs = [o.name for o in prefill.get_outputs()]

    def one_call(ids: np.ndarray) -> None:  # as Decoder._prefill_graph: logits to the host, the state on the device
        io = prefill.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_output("logits", "cpu")
        for name in outputs[1:]:
            io.bind_output(name, graph.device, 0)
        prefill.run_with_iobinding(io)
        io.get_outputs()

    def stepped(ids: np.ndarray) -> None:
        state = graph.init_state(1)
        for token in ids[0]:
            _, state = graph.step(token[None], state)

    for t in prompts:
        ids = rng.integers(0, VOCAB, size=(1, t))
        out["mamba_prefill_onnx"][t] = median_ms(lambda: one_call(ids), reps_for(t, reps, quadratic=False), warmup=1)
        out["mamba_stepped_onnx"][t] = median_ms(lambda: stepped(ids), max(3, reps // (1 + t // 64)), warmup=1)
    return out


def bench_transformer_eager(cfg: ModelConfig, model, prefill, contexts: list[int], reps: int, rng) -> dict:
    out: dict[str, dict[int, float]] = {k: {} for k in ("transformer_eager", "transformer_nocache_onnx",
                                                        "transformer_nocache_eager")}
    for c in contexts:
        cache = model.init_state(1)
        for k, v in zip(cache.keys, cache.values):
            k.normal_(0, 0.1)
            v.normal_(0, 0.1)
        ids = torch.tensor([7])

        def eager_step():
            cache.position.fill_(c)  # step advances it; every call decodes the token at position c
            model.step(ids, cache)

        with torch.no_grad():
            out["transformer_eager"][c] = median_ms(eager_step, reps)

        seq = rng.integers(0, cfg.vocab_size, size=(1, c + 1))
        feed = {"input_ids": seq, "position_ids": np.arange(c + 1)[None]}
        n = reps_for(c, reps, quadratic=True)
        out["transformer_nocache_onnx"][c] = median_ms(lambda: prefill.run(["logits"], feed), n, warmup=1)
        tseq = torch.from_numpy(seq)
        with torch.no_grad():
            out["transformer_nocache_eager"][c] = median_ms(lambda: model(tseq)[:, -1], n, warmup=1)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sokhan.pipeline.plotting import save

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"onnx": "-", "eager": "--"}
    for name, series in results.items():
        xs = sorted(series)
        ax.plot(xs, [series[x] for x in xs], styles["onnx" if "onnx" in name else "eager"], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("time per generated token (ms)")
    ax.set_title("Decode latency at batch 1, CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=positive, nargs="+", default=[16, 64, 256, 1024, 2048, 4096])
    p.add_argument("--prompts", type=positive, nargs="+", default=[64, 256, 1024], help="Mamba prefill: prompt lengths")
    p.add_argument("--prefill-only", action="store_true", help="only the Mamba prefill measurement (prefill.json)")
    p.add_argument("--threads", type=positive, default=1)
    p.add_argument("--reps", type=positive, default=50)
    p.add_argument("--preset", default="tiny", choices=("tiny", "small", "base"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    results: dict[str, dict[int, float]] = {}
    prefill_results: dict[str, dict[int, float]] = {}
    sizes, traffic = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("mamba",) if args.prefill_only else ("mamba", "transformer"):
            cfg = ModelConfig(arch=arch, preset=args.preset, max_seq_len=max(args.contexts) + 8).resolve(VOCAB)
            model = build(cfg).eval()
            sizes[arch] = {"params": sum(p.numel() for p in model.parameters()), "d_model": cfg.d_model, "n_layers": cfg.n_layers}
            path = Path(tmp) / f"{arch}.onnx"
            export_decoder(model, cfg, path)
            specs = state_specs({"state": state_layout(cfg)})
            graph = StepGraph(open_session(path, "cpu", args.threads), specs, arch == "transformer")
            export_prefill(model, cfg, Path(tmp) / f"{arch}.prefill.onnx")
            prefill = open_session(Path(tmp) / f"{arch}.prefill.onnx", "cpu", args.threads)
            if arch == "mamba":
                prefill_results = bench_mamba_prefill(prefill, graph, args.prompts, args.reps, rng)
            if args.prefill_only:
                continue
            int8_path = Path(tmp) / f"{arch}.int8.onnx"
            # The bundle's `--quantize int8` variant: int8 weights in every MatMul/Gemm and, for the transformer, an
            # int8 KV cache. Its scales are calibrated on text at export; their values do not change the work.
            kv_scales = None
            if arch == "transformer":
                kv_scales = {s.input: np.full((1, cfg.n_heads, 1, cfg.d_model // cfg.n_heads), 0.01, np.float32) for s in specs}
            to_int8(path, int8_path, kv_scales=kv_scales)
            session = open_session(int8_path, "cpu", args.threads)
            int8 = StepGraph(session, graph_dtypes(session, specs, int8_path), arch == "transformer")
            results |= bench_graph(f"{arch}_onnx", cfg, graph, args.contexts, args.reps, rng)
            results |= bench_graph(f"{arch}_onnx_int8", cfg, int8, args.contexts, args.reps, rng)
            if arch == "mamba":
                results |= bench_mamba_eager(cfg, model, args.contexts, args.reps, rng)
            else:
                results |= bench_transformer_eager(cfg, model, prefill, args.contexts, args.reps, rng)
            for name, g, graph_path in ((f"{arch}_onnx", graph, path), (f"{arch}_onnx_int8", int8, int8_path)):
                traffic[name] = {c: weight_bytes(graph_path) + state_bytes(g, cfg, c) for c in args.contexts}

    device = f"CPU ({platform.processor() or platform.machine()}), {args.threads} thread(s)"
    common = {"device": device, "onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__,
              "preset": args.preset, "vocab_size": VOCAB, "models": sizes, "batch": 1}
    OUT.mkdir(parents=True, exist_ok=True)
    if results:
        cs = args.contexts
        summary = {}
        if 64 in cs and 2048 in cs:
            summary["mamba_onnx_2048_over_64"] = results["mamba_onnx"][2048] / results["mamba_onnx"][64]
        for arch in ("mamba", "transformer"):
            for graph_name in (f"{arch}_onnx", f"{arch}_onnx_loop", f"{arch}_onnx_int8", f"{arch}_onnx_int8_loop"):
                summary[f"{graph_name}_speedup_over_eager"] = {
                    c: results[f"{arch}_eager"][c] / results[graph_name][c] for c in cs}
        # The roofline: at batch 1 a step reads every weight and the whole state once, so memory bandwidth bounds it.
        roofline = {"mb_per_step": {}, "floor_ms": {}, "loop_gb_per_s": {}}
        for name, per_context in traffic.items():
            roofline["mb_per_step"][name] = {c: b / 1e6 for c, b in per_context.items()}
            roofline["floor_ms"][name] = {c: read_ms(b) for c, b in per_context.items()}
            roofline["loop_gb_per_s"][name] = {c: b / results[f"{name}_loop"][c] / 1e6 for c, b in per_context.items()}
        report = common | {"ms_per_token": {k: {str(c): round(v, 4) for c, v in s.items()} for k, s in results.items()},
                           "summary": summary, "roofline": roofline}
        write_json(OUT / "decode.json", report)
        plot(results, OUT / "decode.png")

        names = list(results)
        print(f"Per-token decode latency (ms), batch 1, {device}, {args.preset} models, vocab {VOCAB}\n")
        print("| context | " + " | ".join(names) + " |")
        print("|---:|" + "---:|" * len(names))
        for c in cs:
            print(f"| {c} | " + " | ".join(f"{results[n][c]:.3f}" for n in names) + " |")
        print()
        for k, v in summary.items():
            print(f"- {k}: " + (f"{v:.2f}" if isinstance(v, float) else ", ".join(f"{c}: {x:.1f}x" for c, x in v.items())))
        print()
        print("Roofline: MB a step reads (weights and state), the time to read that many bytes (floor: summing an "
              "array of that size, same threads), the loop's time and the bandwidth it reaches\n")
        print("| graph | context | MB per step | floor (ms) | loop (ms) | loop GB/s | eager / floor |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in traffic:
            eager = results[name.split("_")[0] + "_eager"]
            for c in cs:
                floor = roofline["floor_ms"][name][c]
                print(f"| {name} | {c} | {roofline['mb_per_step'][name][c]:.1f} | {floor:.3f} | "
                      f"{results[name + '_loop'][c]:.3f} | {roofline['loop_gb_per_s'][name][c]:.1f} | {eager[c] / floor:.1f}x |")
        print()

    fused, stepped = prefill_results["mamba_prefill_onnx"], prefill_results["mamba_stepped_onnx"]
    speedup = {t: stepped[t] / fused[t] for t in args.prompts}
    write_json(OUT / "prefill.json", common | {
        "ms_per_prompt": {k: {str(t): round(v, 3) for t, v in s.items()} for k, s in prefill_results.items()},
        "prefill_speedup_over_stepping": {str(t): round(x, 2) for t, x in speedup.items()},
    })
    print(f"Mamba prompt consumption (ms per prompt), batch 1, {device}, {args.preset} model, vocab {VOCAB}\n")
    print("| prompt tokens | prefill.onnx (one call) | decoder.onnx token by token | speedup |")
    print("|---:|---:|---:|---:|")
    for t in args.prompts:
        print(f"| {t} | {fused[t]:.2f} | {stepped[t]:.2f} | {speedup[t]:.1f}x |")


if __name__ == "__main__":
    run(main)
