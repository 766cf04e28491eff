"""export stage: the one-token decode step as ONNX, in a bundle, checked against PyTorch.

Writes ``RUN/export/bundle/``: ``decoder.onnx`` (weights inside, config in its metadata), ``tokenizer.json`` and
``segmenter.json`` (copied from ``RUN/tokenize``), ``config.json`` (what the torch-free runtime needs),
``parity.json`` and ``README.md``; with ``export.prefill`` also ``prefill.onnx`` (the whole prompt in one call), with
``export.precision = "fp16"`` / ``export.quantize = "int8"`` also ``decoder.fp16.onnx`` / ``decoder.int8.onnx``.

Parity runs on every export: a held-out line per language from ``RUN/tokenize/val/<lang>.txt`` as the prompt, then
``parity_steps`` greedy tokens in PyTorch ``step`` and in ONNX Runtime. A float32 graph whose logits differ by more
than ``parity_atol`` or whose greedy tokens differ fails the stage, so no bundle is published; the figures are then
in ``RUN/export.parity-failed.json``. A variant below ``agreement_target`` top-1 agreement with the float32 graph
is left out of the bundle and reported.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from sokhan import CheckFailed, SokhanError

SECTIONS = ("export",)
UPSTREAM = ("tokenize", "train")
BUNDLE = "bundle"
FAILED_PARITY = "export.parity-failed.json"


@dataclass
class ExportConfig:
    """What is exported and how parity is checked."""

    opset: int = 18
    """ONNX opset of the graphs (the dynamo exporter's own is 18)."""
    prefill: bool = False
    """Also export ``prefill.onnx``: the whole prompt in one call, from an empty state to the step graph's state."""
    precision: Literal["fp32", "fp16"] = "fp32"
    """``fp16``: also ``decoder.fp16.onnx`` (float16 weights, arithmetic and state; float32 logits)."""
    quantize: Literal["none", "int8"] = "none"
    """``int8``: also ``decoder.int8.onnx``: ONNX Runtime dynamic quantization of the matrix weights (a scale per output
    channel) and, for a transformer whose attention is ``GroupQueryAttention``, an int8 KV cache whose scales are
    calibrated on training text (``sokhan.export.kvcache``). Activations get one scale per tensor, per call: a row's
    logits depend a little on the other rows of its batch."""
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    """ONNX Runtime provider for the parity check (the one that actually ran is recorded)."""
    parity_steps: int = 64
    """Greedy tokens generated per language in the parity check."""
    parity_prompt_tokens: int = 32
    """At most this many tokens of the held-out line start each parity run."""
    parity_atol: float = 1e-4
    """Largest max-abs logit difference between PyTorch and the float32 graph that passes."""
    agreement_tokens: int = 256
    """Held-out tokens per language on which a variant's top-1 agreement with float32 is measured."""
    agreement_target: float = 0.95
    """A variant that agrees less often than this is not put in the bundle."""

    def __post_init__(self) -> None:
        if not 14 <= self.opset <= 23:
            raise SokhanError(f"config: export.opset = {self.opset} must be in 14..23 (the exporter's range)")
        for key in ("parity_steps", "parity_prompt_tokens", "agreement_tokens"):
            if getattr(self, key) < 1:
                raise SokhanError(f"config: export.{key} = {getattr(self, key)} must be ≥ 1")
        if not self.parity_atol > 0:
            raise SokhanError(f"config: export.parity_atol = {self.parity_atol} must be > 0")
        if not 0.0 < self.agreement_target <= 1.0:
            raise SokhanError(f"config: export.agreement_target = {self.agreement_target} must be in (0, 1]")


class _SetConfig(argparse.Action):
    """A flag that is shorthand for ``--set export.KEY=VALUE``, so it enters the config and the fingerprint."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = "true" if values is None or values == [] else values
        setattr(namespace, "overrides", [*(getattr(namespace, "overrides", None) or []), f"export.{self.const}={value}"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill", nargs=0, action=_SetConfig, const="prefill",
                        help="also export prefill.onnx (the whole prompt in one call) = --set export.prefill=true")
    parser.add_argument("--precision", choices=("fp32", "fp16"), action=_SetConfig, const="precision",
                        help="fp16: also export decoder.fp16.onnx, checked by top-1 agreement with fp32")
    parser.add_argument("--quantize", choices=("none", "int8"), action=_SetConfig, const="quantize",
                        help="int8: also export decoder.int8.onnx (int8 weights; a transformer's KV cache int8 too), checked by top-1 agreement")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), action=_SetConfig, const="provider",
                        help="ONNX Runtime provider for the parity check")


def held_out_ids(tok_dir: Path, tokenizer, n_tokens: int, skip: int) -> dict[str, list[int]]:
    """Per language, ``<|lang:xx|>`` and the tokens of held-out lines from ``skip`` on, up to ``n_tokens`` ids."""
    out = {}
    for path in sorted((tok_dir / "val").glob("*.txt")):
        lang = path.stem
        ids = [tokenizer.lang_id(lang)]
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for line in lines[skip:]:
            ids += tokenizer.encode_normalized(line, lang) + [tokenizer.eos_id]
            if len(ids) >= n_tokens:
                break
        if len(ids) > 1:
            out[lang] = ids[:n_tokens]
    if not out:
        raise SokhanError(f"{tok_dir / 'val'}: no held-out text (val/<lang>.txt) to check the export on; rerun `sokhan tokenize`")
    return out


def calibration_text(tok_dir: Path, meta: dict, windows: int = 4, length: int = 256) -> list[list[int]]:
    """``windows`` stretches of ``length`` training tokens spread evenly over the training shard: text the held-out
    agreement check never sees, so the int8 cache's scales are not fitted to what judges them."""
    import numpy as np

    from sokhan.pipeline.train.data import open_shard

    shard = open_shard(tok_dir / "train.bin", meta["dtype"], length)
    starts = np.linspace(0, len(shard) - length, windows).astype(int)
    return [shard[s:s + length].tolist() for s in starts]


LANGUAGE_NAMES = {"fa": "Persian", "zh": "Chinese", "en": "English"}
README = """# sokhan bundle ({arch})

A {arch} language model exported by sokhan {version}: {languages} next-token and next-word
prediction with ONNX Runtime, no PyTorch needed.

| file | what |
|---|---|
| `decoder.onnx` | one decode step: `input_ids` (batch, 1) int64{pos} and the state in; `logits` (batch, {vocab}) and the new state out |
{extra}| `tokenizer.json`, `segmenter.json` | the tokenizer the model was trained with (HF tokenizers + sokhan's segmentation settings) |
| `config.json` | architecture, special tokens, state tensor names and shapes, opset |
| `parity.json` | {steps} greedy steps per language, PyTorch against ONNX Runtime: max abs logit diff {diff:.2e}, tokens identical: {same} |

## Run it

The runtime imports numpy, onnxruntime and sokhan's tokenizer (tokenizers, jieba, hazm), never torch: on a machine
without torch, install those and sokhan itself without its dependencies, from a checkout of its repository or a
wheel built there (`pip install --no-deps PATH/TO/CHECKOUT`, `pip install --no-deps sokhan-*.whl`; it is not on PyPI).
A later `pip install` or `pip check` then lists torch and the training packages as missing requirements:
expected, as `generate` and `predict` never import them (the other commands say so in one line).
It needs onnxruntime 1.28 or newer (older releases cannot load some of sokhan's graphs, or compute them wrong),
and hazm and jieba at the versions `segmenter.json` names (their rules cut the text into the pieces the model
learned; another version gets a one-line warning).
On a GPU, `pip install "onnxruntime-gpu[cuda,cudnn]"` brings the CUDA libraries ONNX Runtime needs (without them
it runs on the CPU and says so).

    sokhan generate --bundle . --prompt "..."
    sokhan predict --bundle . "..."
    sokhan predict --bundle . - < prompts.txt     # one prompt per line; one JSON object per line out

or from Python:

    from sokhan.export.runtime import Decoder
    decoder = Decoder(".")                     # provider="auto" | "cuda" | "cpu"
    print(decoder.generate("...", max_new_tokens=32))
    print(decoder.next_words("...", k=5))

## Driving the graph yourself

Start from the state in `config.json`'s `state` list: zeros of the given shape with `batch` your batch size{past},
in the dtype the graph's inputs declare: float32, float16 in `decoder.fp16.onnx` (its logits stay float32), int8
for the KV cache of a transformer's `decoder.int8.onnx` (its per-channel scales are inside the graph). The int8
graph quantizes activations with one scale per call, so a row's logits depend a little on the rest of its batch.
Prefix the prompt's tokens with its language tag ({tags}; the model was trained on those), feed one token per
call, and pass each `present.*` output back as the matching `past_key_values.*` input.{posnote}
"""


IN_PLACE = """

The attention is ONNX Runtime's `GroupQueryAttention` contrib node (domain `com.microsoft`), so the graph needs
ONNX Runtime. It can also append to the caches in place, as onnxruntime-genai does: allocate each cache once at
the length you will reach, (batch, heads, length, head_dim), and with IOBinding bind the same buffer as
`past_key_values.*` and as `present.*`; each call then writes its token's key and value at `position_ids`
instead of copying the cache into a new `present` (what `Decoder.generate` does)."""


def run(ctx) -> dict:
    import shutil

    import onnx
    import torch

    from sokhan.export import onnx as onnx_export
    from sokhan.export import kvcache, parity, prefill, quantize
    from sokhan.export.runtime import CONFIG, DECODER, SEGMENTER, TOKENIZER, Decoder, file_digests
    from sokhan.pipeline.stage import atomic_write, log, write_json
    from sokhan.pipeline.stages.tokenize import read_meta
    from sokhan.pipeline.train.checkpoint import load_model
    from sokhan.tokenization import Tokenizer

    cfg: ExportConfig = ctx.config.export
    tok_dir, train_dir = ctx.upstream("tokenize"), ctx.upstream("train")
    bundle = ctx.out / BUNDLE
    bundle.mkdir(parents=True, exist_ok=True)
    for name in (TOKENIZER, SEGMENTER):
        shutil.copyfile(tok_dir / name, bundle / name)
    tokenizer = Tokenizer.load(bundle / TOKENIZER)
    model, mcfg = load_model(train_dir, device="cpu")
    model = model.float().eval()
    if mcfg.vocab_size != tokenizer.vocab_size:
        raise SokhanError(f"{train_dir}: model vocabulary {mcfg.vocab_size} != tokenizer vocabulary {tokenizer.vocab_size} in {tok_dir}")

    torch.manual_seed(0)
    log(f"export: tracing the {mcfg.arch} step (opset {cfg.opset})")
    onnx_export.export_decoder(model, mcfg, bundle / DECODER, cfg.opset)
    if cfg.prefill:
        log("export: tracing the prefill" + (" (scan over the prompt)" if mcfg.arch == "mamba" else ""))
        prefill.export_prefill(model, mcfg, bundle / "prefill.onnx", cfg.opset)
    trained = read_meta(tok_dir).get("tokens", {}).get("train", {})
    languages = [lang for lang, n in trained.items() if n] or None
    config = onnx_export.bundle_config(mcfg, tokenizer.special_tokens, cfg.opset, cfg.prefill, languages)
    config["files"] = file_digests(bundle)  # the runtime refuses a tokenizer or a graph from another run
    for graph in [DECODER] + (["prefill.onnx"] if cfg.prefill else []):
        onnx_export.write_metadata(bundle / graph, config)
    write_json(bundle / CONFIG, config)

    decoder = Decoder(bundle, provider=cfg.provider)
    prompts = held_out_ids(tok_dir, tokenizer, cfg.parity_prompt_tokens, skip=0)
    budget = mcfg.max_seq_len - cfg.parity_steps if mcfg.arch == "transformer" else None
    if budget is not None and budget < 1:
        raise SokhanError(f"config: export.parity_steps = {cfg.parity_steps} leaves no room for a prompt within model.max_seq_len = {mcfg.max_seq_len}")
    report = {"graph": DECODER, "providers": decoder.providers, "atol": cfg.parity_atol, "languages": {}}
    for lang, ids in prompts.items():
        log(f"export: parity {lang} ({len(ids)} prompt tokens + {cfg.parity_steps} greedy steps)")
        report["languages"][lang] = parity.compare(model, decoder, ids[:budget] if budget else ids, cfg.parity_steps, cfg.parity_atol)
    report["max_abs_diff"] = max(r["max_abs_diff"] for r in report["languages"].values())
    report["tokens_identical"] = all(r["tokens_identical"] for r in report["languages"].values())
    report["passed"] = all(r["passed"] for r in report["languages"].values())
    if not report["passed"]:
        write_json(ctx.run_dir / FAILED_PARITY, report)
        bad = next(lang for lang, r in report["languages"].items() if not r["passed"])
        r = report["languages"][bad]
        tokens = ("the greedy tokens agree" if r["first_mismatch_step"] is None
                  else f"first differing greedy token at step {r['first_mismatch_step']}")
        raise CheckFailed(
            f"export: float32 parity failed for {bad}: max abs logit diff {r['max_abs_diff']:.3g} (limit {cfg.parity_atol:g}), "
            f"{tokens}; bundle not published, details in {ctx.run_dir / FAILED_PARITY}"
        )
    (ctx.run_dir / FAILED_PARITY).unlink(missing_ok=True)  # an earlier attempt's; this one passed

    variants = {}
    if cfg.precision == "fp16":
        variants["fp16"] = (quantize.FP16, quantize.to_fp16)
    if cfg.quantize == "int8":
        convert = quantize.to_int8
        if config.get("kv_share_buffer"):  # the cache lives in GroupQueryAttention, which can keep it as int8
            log("export: calibrating the int8 KV cache on training text")
            text = calibration_text(tok_dir, read_meta(tok_dir), length=min(256, mcfg.max_seq_len))
            scales = kvcache.calibrate(decoder, text)
            convert = partial(quantize.to_int8, kv_scales=scales)
        variants["int8"] = (quantize.INT8, convert)
    if variants:
        held_out = list(held_out_ids(tok_dir, tokenizer, cfg.agreement_tokens, skip=1).values())
        report["variants"] = {}
        for name, (file, convert) in variants.items():
            convert(bundle / DECODER, bundle / file)
            result = quantize.agreement(decoder, Decoder(bundle, provider=cfg.provider, graph=file), held_out)
            result["published"] = result["top1_agreement"] >= cfg.agreement_target
            result["bytes"] = (bundle / file).stat().st_size
            report["variants"][name] = result
            log(f"export: {file} top-1 agreement with fp32 {result['top1_agreement']:.3f} over {result['positions']} positions")
            if result["published"]:
                config["variants"][name] = file
            else:
                log(f"export: {file} below the {cfg.agreement_target:.0%} agreement target, left out of the bundle")
                (bundle / file).unlink()
        write_json(bundle / CONFIG, config)
        # Each graph carries the final config (with the variants that were kept), and a variant its own state dtypes
        # (float16, or an int8 KV cache), which the graph's inputs declare.
        for graph in [DECODER] + (["prefill.onnx"] if cfg.prefill else []):
            onnx_export.write_metadata(bundle / graph, config)
        for name, file in config["variants"].items():
            specs = Decoder(bundle, provider="cpu", graph=file).specs
            state = [dict(entry, dtype=spec.dtype) for entry, spec in zip(config["state"], specs, strict=True)]
            onnx_export.write_metadata(bundle / file, dict(config, state=state), check=False)
            report["variants"][name]["bytes"] = (bundle / file).stat().st_size  # as published, metadata included
    write_json(bundle / "parity.json", report)

    extra = "".join(f"| `{f}` | {n} variant of the step (top-1 agreement with fp32: {report['variants'][n]['top1_agreement']:.1%}) |\n"
                    for n, f in config["variants"].items())
    if cfg.prefill:
        ins = "`input_ids`, `position_ids`" if mcfg.arch == "transformer" else "`input_ids`"
        extra = f"| `prefill.onnx` | the whole prompt in one call from an empty state: {ins} (batch, T) -> last logits and the `present.*` state |\n" + extra
    transformer = mcfg.arch == "transformer"
    atomic_write(bundle / "README.md", README.format(
        arch=mcfg.arch, version=config["sokhan_version"], vocab=mcfg.vocab_size, extra=extra,
        languages=" / ".join(LANGUAGE_NAMES[lang] for lang in languages or LANGUAGE_NAMES),
        tags=", ".join(f"`<|lang:{lang}|>`" for lang in languages or LANGUAGE_NAMES),
        pos=", `position_ids` (batch, 1) int64" if transformer else "", steps=cfg.parity_steps,
        diff=report["max_abs_diff"], same=report["tokens_identical"],
        past=" and `past` 0 (the key/value caches start empty)" if transformer else "",
        posnote=(f" `position_ids` is the token's index in the sequence (0 for the first), below {mcfg.max_seq_len}."
                 + (IN_PLACE if config.get("kv_share_buffer") else "")) if transformer else "",
    ))
    onnx.checker.check_model(str(bundle / DECODER), full_check=True)
    return {
        "arch": mcfg.arch,
        "providers": decoder.providers,
        "parity_max_abs_diff": report["max_abs_diff"],
        "parity_tokens_identical": report["tokens_identical"],
        "decoder_bytes": (bundle / DECODER).stat().st_size,
        "variants": {n: {"top1_agreement": v["top1_agreement"], "published": v["published"]} for n, v in report.get("variants", {}).items()},
    }
