"""How much each part of the int8 variant changes a trained model: top-1 agreement with its float32 graph.

For each run directory with an exported bundle (``sokhan export``), on the export stage's own held-out positions
(256 tokens per language, teacher forcing, as ``quantize.agreement`` judges a variant):

- int8 weights with one scale per matrix (before) and one per output channel (the variant's now);
- for a transformer whose attention is ``GroupQueryAttention``: the int8 KV cache alone, on the float32 weights,
  at several calibration headrooms (``kvcache.HEADROOM`` is chosen from these), and the whole variant (weights per
  channel and the cache at the default headroom).

    python benchmarks/int8_agreement.py runs/corpora-mamba-8k runs/corpora-transformer

Writes ``benchmarks/out/int8_agreement.json`` and prints a markdown table. Works on a copy of each bundle.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from functools import partial
from pathlib import Path

import onnx

from bench_cli import run

from sokhan.export import kvcache
from sokhan.export.quantize import agreement, to_int8
from sokhan.export.runtime import Decoder
from sokhan.pipeline.stage import read_json, write_json
from sokhan.pipeline.stages.export import calibration_text, held_out_ids

OUT = Path(__file__).resolve().parent / "out"
HEADROOMS = (1.0, 1.25, 1.6, 2.0)


def cache_only(src: Path, dst: Path, scales) -> None:
    model = onnx.load(str(src))
    kvcache.quantize_cache(model, scales)
    onnx.save(model, str(dst))


def measure(run: Path, tmp: Path) -> dict:
    bundle = tmp / run.name
    shutil.copytree(run / "export" / "bundle", bundle)
    tok_dir = run / "tokenize"
    fp32 = Decoder(bundle, provider="cpu")
    held_out = list(held_out_ids(tok_dir, fp32.tokenizer, 256, skip=1).values())
    graphs = {"weights, per matrix": partial(to_int8, per_channel=False), "weights, per channel": to_int8}
    if fp32.config.get("kv_share_buffer"):
        length = min(256, fp32.config["model"]["max_seq_len"])
        text = calibration_text(tok_dir, read_json(tok_dir / "meta.json"), length=length)
        for h in HEADROOMS:
            graphs[f"KV cache only, headroom {h}"] = partial(cache_only, scales=kvcache.calibrate(fp32, text, headroom=h))
        graphs["weights per channel + KV cache (the variant)"] = partial(to_int8, kv_scales=kvcache.calibrate(fp32, text))
    out = {}
    for i, (name, convert) in enumerate(graphs.items()):
        convert(bundle / "decoder.onnx", bundle / f"v{i}.onnx")
        out[name] = agreement(fp32, Decoder(bundle, provider="cpu", graph=f"v{i}.onnx"), held_out)
        print(f"{run.name}: {name}: {out[name]['top1_agreement']:.2%}", flush=True)
    return {"arch": fp32.config["arch"], "graphs": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="run directories with an exported bundle")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {str(run_dir): measure(run_dir, Path(tmp)) for run_dir in args.runs}
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "int8_agreement.json", results)
    print("\n| run | arch | graph | top-1 agreement | positions | max abs logit diff |")
    print("|---|---|---|---:|---:|---:|")
    for run_dir, r in results.items():
        for name, a in r["graphs"].items():
            print(f"| {Path(run_dir).name} | {r['arch']} | {name} | {a['top1_agreement']:.2%} | {a['positions']} | "
                  f"{a['max_abs_logit_diff']:.2f} |")


if __name__ == "__main__":
    run(main)
