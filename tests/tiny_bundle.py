"""Tiny exported bundles for the export, runtime and parity tests, built once per test process.

A bundle comes from the real export stage (``run_stage("export", ...)``) on a tiny run directory: the tokenizer and
shards of ``tiny_run.make_tiny_run``, held-out lines in ``tokenize/val/<lang>.txt``, and an untrained tiny model
saved where the train stage puts it. Exporting takes a few seconds, so each bundle is made once and shared.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from tiny_run import WORDS, make_tiny_run, tiny_config

# One bundle with every optional graph: the prefill, fp16 and int8 tests share it (each export costs seconds).
FULL = ("export.prefill=true", "export.precision=fp16", "export.quantize=int8")
ARCH_OVERRIDES = {
    "mamba": ["model.arch=mamba", "model.d_model=32", "model.n_layers=2"],
    "transformer": ["model.arch=transformer", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=160"],
}


def tampered(export_fn):
    """``export_fn`` (an ``export_*(model, cfg, path, opset)``) tracing a model with one weight changed, restored
    after: a graph that must fail the parity check."""

    def export(model, cfg, path, opset=18):
        import torch

        with torch.no_grad():
            model.get_input_embeddings().weight[:, 0] += 0.5
        try:
            export_fn(model, cfg, path, opset)
        finally:
            with torch.no_grad():
                model.get_input_embeddings().weight[:, 0] -= 0.5

    return export


def val_lines(lang: str, n: int = 6, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    sep = "" if lang == "zh" else " "
    return [sep.join(rng.choice(WORDS[lang], size=int(rng.integers(6, 12)))) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def tiny_run(arch: str) -> Path:
    """A run directory with finished ``tokenize`` and ``train`` stages for a tiny untrained ``arch`` model."""
    import torch

    from sokhan.pipeline.config import to_dict
    from sokhan.pipeline.models import build
    from sokhan.pipeline.stage import sha256_file, write_json
    from sokhan.pipeline.train.checkpoint import save_model_folder
    from sokhan.tokenization import Tokenizer

    run = Path(tempfile.mkdtemp(prefix=f"sokhan-export-{arch}-"))
    atexit.register(shutil.rmtree, run, ignore_errors=True)
    make_tiny_run(run)
    val = run / "tokenize" / "val"
    val.mkdir()
    for lang in WORDS:
        (val / f"{lang}.txt").write_text("\n".join(val_lines(lang)) + "\n", encoding="utf-8")
    config = tiny_config(*ARCH_OVERRIDES[arch])
    vocab = Tokenizer.load(run / "tokenize" / "tokenizer.json").vocab_size
    mcfg = config.model.resolve(vocab)
    torch.manual_seed(0)
    model = build(mcfg)
    with torch.no_grad():  # an untrained model's logits are nearly flat; spread them so greedy choices are clear
        model.get_input_embeddings().weight.mul_(20.0)
    run_config = to_dict(config) | {"model": to_dict(mcfg)}
    save_model_folder(run / "train", model, run_config)
    outputs = {p.name: sha256_file(p) for p in sorted((run / "train").iterdir()) if p.is_file()}
    write_json(run / "train" / "manifest.json", {"stage": "train", "outputs": outputs, "metrics": {}})
    return run


def config(arch: str, *overrides: str):
    return tiny_config(*ARCH_OVERRIDES[arch], *overrides)


@functools.lru_cache(maxsize=None)
def tiny_bundle(arch: str, *overrides: str) -> Path:
    """``RUN/export/bundle`` of the export stage run on ``tiny_run(arch)`` with ``overrides`` (``export.KEY=VALUE``)."""
    from sokhan.pipeline.stage import run_stage

    run = tiny_run(arch)
    run_stage("export", config(arch, *overrides), run, force=True)
    # The next export on this run replaces RUN/export; keep this bundle apart.
    keep = Path(tempfile.mkdtemp(prefix="sokhan-bundle-"))
    atexit.register(shutil.rmtree, keep, ignore_errors=True)
    keep = keep / "bundle"
    shutil.copytree(run / "export" / "bundle", keep)
    return keep
