"""Export the one-token decode step of a sokhan model to ONNX (the whole-prompt prefill: ``sokhan.export.prefill``).

The graph is the model's ``step`` with the state flattened into named inputs and outputs, in the names
onnxruntime-genai and optimum use:

- Mamba: ``input_ids`` (B, 1) and per layer ``past_key_values.{i}.conv_state`` (B, D_inner, d_conv),
  ``past_key_values.{i}.recurrent_state`` (B, D_inner, N) -> ``logits`` (B, V), ``present.{i}.conv_state``,
  ``present.{i}.recurrent_state``.
- Transformer: ``input_ids`` (B, 1), ``position_ids`` (B, 1) and per layer ``past_key_values.{i}.key`` /
  ``.value`` (B, nh, P, hs) -> ``logits`` (B, V), ``present.{i}.key`` / ``.value`` (B, nh, P + 1, hs). The
  transformer graph is ``forward_with_past`` for one token, so P is a dynamic axis and P = 0 starts a sequence;
  its attention is ONNX Runtime's ``GroupQueryAttention`` (``sokhan.export.gqa``), which also appends in place
  when past and present are bound to one buffer of fixed capacity (``runtime.CacheLoop``).

The export traces under ``dispatch.use("reference")`` (plain PyTorch ops), with example batch 2 and past 3: the
dynamo exporter specialises any axis whose example size is 0 or 1, so the examples must be at least 2.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sokhan import SokhanError, __version__
from sokhan.export.runtime import BUNDLE_FORMAT, BUNDLE_VERSION, DECODER, METADATA_KEY
from sokhan.pipeline.models.config import ModelConfig

EXAMPLE_BATCH = 2
EXAMPLE_PAST = 3


def state_layout(cfg: ModelConfig) -> list[dict[str, Any]]:
    """Per state tensor, in ``state.tensors()`` order: graph input and output names, shape, dtype."""
    out = []
    for i in range(cfg.n_layers):
        if cfg.arch == "mamba":
            pairs = (("conv_state", [cfg.d_inner, cfg.d_conv]), ("recurrent_state", [cfg.d_inner, cfg.d_state]))
            out += [{"input": f"past_key_values.{i}.{n}", "output": f"present.{i}.{n}", "shape": ["batch", *s], "dtype": "float32"}
                    for n, s in pairs]
        else:
            shape = ["batch", cfg.n_heads, "past", cfg.d_model // cfg.n_heads]
            out += [{"input": f"past_key_values.{i}.{n}", "output": f"present.{i}.{n}", "shape": shape, "dtype": "float32"}
                    for n in ("key", "value")]
    return out


class MambaStep(nn.Module):
    """input_ids (B, 1), state tensors -> logits (B, V), new state tensors: ``model.step`` made functional."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from sokhan.pipeline.models.state import MambaState

        # step updates its state in place; the graph's inputs must stay untouched, so it works on copies.
        st = MambaState.from_tensors([t.clone() for t in state])
        logits, st = self.model.step(input_ids[:, 0], st)
        return (logits, *st.tensors())


class TransformerStep(nn.Module):
    """input_ids, position_ids (B, T), past k/v (B, nh, P, hs) -> last logits (B, V), present (B, nh, P + T, hs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        pairs = list(zip(past[0::2], past[1::2]))
        logits, present = self.model.forward_with_past(input_ids, position_ids, pairs)
        return (logits[:, -1], *[t for kv in present for t in kv])


class TransformerGQAStep(nn.Module):
    """input_ids, position_ids (B, 1), past k/v (B, nh, P, hs) -> logits (B, V), present (B, nh, P + 1, hs).

    ``Transformer.forward_with_past`` for one token, its attention through ``GroupQueryAttention``
    (``sokhan.export.gqa``), which can append to a cache in place: the blocks' own modules, wired as
    ``Block.forward_with_past`` wires them. For head sizes the contrib kernel takes (``gqa.usable``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from sokhan.export.gqa import group_query_attention

        m = self.model
        seqlens_k = position_ids[:, -1].to(torch.int32)  # (B,): the new token's index in its row
        total = (seqlens_k.max() + 1).to(torch.int32)
        x = m.embeddings(input_ids)  # (B, 1, C)
        present = []
        for block, key, value in zip(m.layers, past[0::2], past[1::2]):
            attn = block.attn
            y, key, value = group_query_attention(attn.c_attn(block.norm_1(x)), key, value, seqlens_k, total,
                                                  m.rotary.cos, m.rotary.sin, attn.n_heads)
            x = block._with_mlp(x, attn.c_proj(y))
            present += [key, value]
        return (m._logits(x[:, -1]), *present)


def kv_share_buffer(cfg: ModelConfig) -> bool:
    """Whether the step graph can append to its KV cache in place (its attention is ``GroupQueryAttention``)."""
    from sokhan.export.gqa import usable

    return cfg.arch == "transformer" and usable(cfg.d_model // cfg.n_heads)


def _example_state(model: nn.Module, cfg: ModelConfig) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [[EXAMPLE_BATCH if d == "batch" else EXAMPLE_PAST if d == "past" else d for d in s["shape"]] for s in state_layout(cfg)]
    return [torch.randn(s, generator=g) * 0.1 for s in shapes]


def export_decoder(model: nn.Module, cfg: ModelConfig, path: Path, opset: int = 18) -> None:
    """Write the one-token step graph of ``model`` (eval mode, float32, CPU) to ``path``, weights inside."""
    from torch.export import Dim

    layout = state_layout(cfg)
    batch = Dim("batch", min=1, max=4096)
    ids = torch.randint(0, cfg.vocab_size, (EXAMPLE_BATCH, 1))
    state = _example_state(model, cfg)
    names_in = ["input_ids"] + [s["input"] for s in layout]
    names_out = ["logits"] + [s["output"] for s in layout]
    if cfg.arch == "mamba":
        wrapper: nn.Module = MambaStep(model)
        args: tuple = (ids, state)
        dynamic: dict = {"input_ids": {0: batch}, "state": [{0: batch} for _ in layout]}
    else:
        past = Dim("past", min=0, max=cfg.max_seq_len - 1)
        wrapper = TransformerGQAStep(model) if kv_share_buffer(cfg) else TransformerStep(model)
        args = (ids, torch.full((EXAMPLE_BATCH, 1), EXAMPLE_PAST), state)
        dynamic = {"input_ids": {0: batch}, "position_ids": {0: batch}, "past": [{0: batch, 2: past} for _ in layout]}
        names_in.insert(1, "position_ids")
    export_graph(wrapper.eval(), args, dynamic, names_in, names_out, path, opset)


def _softplus(x, beta: float = 1.0, threshold: float = 20.0):
    """aten.softplus as one ONNX ``Softplus`` (Δ's activation in every Mamba layer).

    The exporter's own translation adds ``Where(x > threshold, x, …)`` for torch's linear tail, two more nodes per
    layer in a graph whose cost at batch 1 is mostly per-node overhead. ONNX Runtime's Softplus is computed stably
    (x + log1p(exp(-x)) for x > 0), and above the threshold of 20 it equals x in float32 and float16 alike.
    """
    from onnxscript import opset18 as op

    if beta != 1.0:
        scaled = op.Mul(x, op.CastLike(beta, x))
        return op.Where(op.Greater(scaled, op.CastLike(threshold, x)), x, op.Div(op.Softplus(scaled), op.CastLike(beta, x)))
    return op.Softplus(x)


def export_graph(wrapper: nn.Module, args: tuple, dynamic: dict, names_in: list[str], names_out: list[str], path: Path, opset: int) -> None:
    """Trace ``wrapper(*args)`` on the reference kernels to ONNX at ``path`` (weights inside, through a temporary
    file), with the ``dynamic`` axes checked to have come out dynamic."""
    import onnx

    from sokhan.export.gqa import TRANSLATION as GQA_TRANSLATION
    from sokhan.kernels import dispatch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    # The exporter reports progress on stdout and logs/warns about its internals; the stage reports what matters.
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with dispatch.use("reference"), torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, args, str(tmp), input_names=names_in, output_names=names_out, opset_version=opset,
                dynamo=True, dynamic_shapes=dynamic, external_data=False,
                custom_translation_table={torch.ops.aten.softplus.default: _softplus, **GQA_TRANSLATION},
            )
    finally:
        log.setLevel(level)
    # torch.export may fix an axis marked dynamic without a word (size-1 examples, unrolled loops): check the graph.
    graph = onnx.load(str(tmp), load_external_data=False).graph
    flat = [dynamic[k] for k in dynamic if not isinstance(dynamic[k], list)] + [d for k in dynamic if isinstance(dynamic[k], list) for d in dynamic[k]]
    for value, axes in zip(graph.input, flat):
        dims = value.type.tensor_type.shape.dim
        fixed = [a for a in axes if dims[a].HasField("dim_value")]
        if fixed:
            tmp.unlink()
            raise SokhanError(f"ONNX export of {path.name}: input {value.name} axis {fixed[0]} came out fixed at {dims[fixed[0]].dim_value}, not dynamic")
    tmp.replace(path)


def write_metadata(path: Path, config: dict[str, Any], check: bool = True) -> None:
    """Put the bundle config into the graph's ``metadata_props`` and check the model; rewrites ``path``.

    ``check = False`` for a variant made by ONNX Runtime's tools (its int8 ``GroupQueryAttention`` takes inputs that
    the ``onnx`` package's copy of the contrib schema does not know yet); it is judged by running it instead."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in ((METADATA_KEY, json.dumps(config, ensure_ascii=False)), ("sokhan.version", __version__),
                       ("sokhan.arch", config["arch"])):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "sokhan"
    if check:
        onnx.checker.check_model(model, full_check=True)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(path)


def bundle_config(cfg: ModelConfig, special_tokens: dict[str, int], opset: int, prefill: bool,
                  languages: list[str] | None = None) -> dict[str, Any]:
    """``config.json`` of a bundle: what the runtime needs to drive the graph without torch.

    ``languages``: those the model was trained on (the runtime warns about a prompt in another one).
    """
    from sokhan.pipeline.config import to_dict

    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "sokhan_version": __version__,
        "arch": cfg.arch,
        "model": to_dict(cfg),
        "vocab_size": cfg.vocab_size,
        "special_tokens": special_tokens,
        "languages": languages,
        "opset": opset,
        "decoder": DECODER,
        "prefill": "prefill.onnx" if prefill else None,
        "uses_position_ids": cfg.arch == "transformer",
        # The step graph appends to a KV cache in place when past and present share a buffer (runtime.CacheLoop).
        "kv_share_buffer": kv_share_buffer(cfg),
        "max_context": cfg.max_seq_len if cfg.arch == "transformer" else None,
        "state": state_layout(cfg),
        "variants": {},
    }
