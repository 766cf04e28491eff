"""Which ONNX Runtime releases run sokhan's bundles right: the evidence behind the lower bound in pyproject.toml
and ``sokhan.export.runtime.MIN_ONNXRUNTIME``.

    .venv/bin/python benchmarks/ort_compat.py BUNDLE [BUNDLE ...] --versions 1.27.0 1.28.0 1.32.0

A bundle with every graph sokhan writes comes from ``sokhan export --run-dir RUN --prefill --precision fp16
--quantize int8`` (once per architecture). For each version, a virtual environment under ``build/ort-compat/``
gets that ``onnxruntime`` from the package index (numpy < 2, which hazm's pin needs), and this script runs
again inside it, where the ``onnxruntime`` it imports is that version and everything else (sokhan, tokenizers,
jieba, hazm) comes from this environment. There, through the runtime users call (``Decoder``, provider CPU), each
step graph of each bundle decodes 16 tokens greedily from a prompt per language (the in-place loops ``generate``
uses, and the prefill graph where the bundle has one), predicts the next 3 words of each (the batched beam
search) and steps the Persian and Chinese prompts side by side as one batch of 2 (the step API). The figures are
compared with the same run under this environment's ``onnxruntime``:

- ``ok``: the same texts and words, and the step logits within the graph's tolerance (1e-4 for float32 and int8
  graphs, whose arithmetic differs between releases only in rounding; 0.1 for float16), max difference shown;
- ``differs``: it loads and runs but computes something else;
- ``fails to load`` / ``fails to run``: ONNX Runtime refuses the graph, or fails while running it (its messages
  are in the JSON).

Writes ``benchmarks/out/ort_compat.json`` and prints a markdown table. The child runs lift the runtime's own
version check (``MIN_ONNXRUNTIME``): the point is to see what each release does. Needs the package index (pip);
about 4 s a version once it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / "build" / "ort-compat"
OUT = ROOT / "benchmarks" / "out" / "ort_compat.json"
PROMPTS = {"fa": "در جنگل یک", "zh": "北京是中国的", "en": "The weather is"}
TOLERANCE = {"float32": 1e-4, "int8": 1e-4, "float16": 0.1}  # by the graph's state dtype


def graphs(bundle: Path) -> list[str]:
    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    return ["decoder.onnx", *config.get("variants", {}).values()]


def name(bundle: Path) -> str:
    """A bundle's label in the table: its architecture."""
    return json.loads((bundle / "config.json").read_text(encoding="utf-8"))["arch"]


def measure(bundle: Path, graph: str) -> dict:
    """What one step graph computes, through ``Decoder``: greedy texts per language and step-API logits."""
    import numpy as np

    from sokhan.export import runtime
    from sokhan.export.runtime import Decoder

    runtime.MIN_ONNXRUNTIME = (0,)  # measure what this release does, even where the runtime would refuse it
    try:
        decoder = Decoder(bundle, provider="cpu", graph=graph, threads=1)
    except Exception as e:  # noqa: BLE001 - reported, whatever ONNX Runtime raises
        return {"status": "load", "error": str(e).strip().splitlines()[0][:300]}
    try:
        texts = {lang: decoder.generate(p, max_new_tokens=16) for lang, p in PROMPTS.items()}
        words = {lang: [w for w, _ in decoder.next_words(p, k=3)] for lang, p in PROMPTS.items()}
        # The step API at batch 2, two sequences side by side (what the next-word search runs).
        rows = [decoder.encode_prompt(PROMPTS[lang]) for lang in ("fa", "zh")]
        steps = min(map(len, rows))
        state, logits = decoder.init_state(2), []
        for t in range(steps):
            out, state = decoder.step(np.array([rows[0][t], rows[1][t]]), state)
            logits.append(out.astype(np.float32).tolist())
    except Exception as e:  # noqa: BLE001
        return {"status": "run", "error": str(e).strip().splitlines()[0][:300]}
    dtype = decoder.specs[0].dtype
    return {"status": "ran", "texts": texts, "words": words, "logits": logits, "dtype": str(np.dtype(dtype))}


def child(bundles: list[Path]) -> None:
    import onnxruntime

    print(json.dumps({"version": onnxruntime.__version__,
                      "graphs": {f"{name(b)} {g}": measure(b, g) for b in bundles for g in graphs(b)}}))


def venv_python(version: str) -> Path:
    venv = VENVS / version
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import onnxruntime; print(onnxruntime.__version__)"], capture_output=True, text=True)
    if probe.stdout.strip() != version:
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"onnxruntime=={version}", "numpy<2"], check=True)
    return python


def run_child(python: Path, bundles: list[Path]) -> dict:
    # The child's own site-packages (its onnxruntime, numpy) come first; this environment's, added after them with
    # its .pth files (sokhan's editable install is one), serve the rest.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ORT_COMPAT_SITE": sysconfig.get_paths()["purelib"]}
    proc = subprocess.run([str(python), __file__, "--child", *map(str, bundles)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"ort_compat: the run under {python} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verdict(got: dict, ref: dict) -> str:
    import numpy as np

    if got["status"] != "ran":
        return f"fails to {got['status']}"
    diff = float(np.abs(np.array(got["logits"]) - np.array(ref["logits"])).max())
    same = got["texts"] == ref["texts"] and got["words"] == ref["words"]
    ok = same and diff <= TOLERANCE[ref["dtype"]]
    return f"{'ok' if ok else 'differs'} ({diff:.1e}{'' if same else ', other words'})"


def main() -> None:
    if "--child" in sys.argv:
        import site

        site.addsitedir(os.environ["ORT_COMPAT_SITE"])
        child([Path(b) for b in sys.argv[sys.argv.index("--child") + 1:]])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--versions", nargs="+", required=True)
    args = parser.parse_args()
    bundles = [b.resolve() for b in args.bundles]
    for b in bundles:
        if not (b / "config.json").is_file():
            raise SystemExit(f"ort_compat: {b}: not an exported bundle (no config.json)")
    import onnxruntime

    reference = run_child(Path(sys.executable), bundles)
    for key, got in reference["graphs"].items():
        if got["status"] != "ran":
            raise SystemExit(f"ort_compat: {key} fails under this environment's onnxruntime {onnxruntime.__version__}: {got['error']}")
    table, errors = {}, {}
    for version in args.versions:
        result = run_child(venv_python(version), bundles)
        table[result["version"]] = {key: verdict(got, reference["graphs"][key]) for key, got in result["graphs"].items()}
        errors[result["version"]] = {key: got["error"] for key, got in result["graphs"].items() if "error" in got}
        print(f"{result['version']}: done", file=sys.stderr)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"reference": reference["version"], "results": table, "errors": errors}, indent=1, ensure_ascii=False) + "\n")
    keys = list(reference["graphs"])
    print(f"| onnxruntime | {' | '.join(keys)} |")
    print(f"|---|{'---|' * len(keys)}")
    for version, row in table.items():
        print(f"| {version} | {' | '.join(row[k] for k in keys)} |")


if __name__ == "__main__":
    main()
