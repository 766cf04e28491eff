"""An int8 KV cache for the transformer's step graph, part of the ``--quantize int8`` variant.

At long contexts a decode step's time is the time to read the cache: at batch 1, every step reads every key and
value once (8 MB at context 4096 for the tiny transformer, more than its 5.8 MB of weights). ONNX Runtime's
``GroupQueryAttention`` (1.31) stores the cache as int8 with a float scale per head and channel
(``k_quant_type = v_quant_type = "PER_CHANNEL"``, ``kv_cache_bit_width = 8``): it quantizes the new key and value
as it appends them and dequantizes as it attends. The cache then takes a quarter of the bytes and of the memory.

The scales are static, so they are calibrated once, at export, on text: the largest magnitude each channel takes.
Keys are stored after the rotary embedding, which turns each channel pair (i, i + hs/2) by a position-dependent
angle; a channel's largest value at positions the calibration text did not reach is bounded by its pair's largest
norm, not by its own largest value, so both channels of a pair get that norm (a bound that holds at every position).
Values outside the scale's range are clipped by the kernel, and clipping costs more than resolution: on the trained
corpora transformer (top-1 agreement of the cache-only quantization with float32 over 768 held-out positions,
``benchmarks/int8_agreement.py``) a headroom of 1.0 agreed on 99.22 % with a worst logit difference of 1.31, 1.25 on
99.61 % (0.28), 1.6 and 2.0 on 99.48 % (0.42, 0.45). Hence ``HEADROOM`` = 1.25.

Whether the result is still the same model is judged as for the other variants: top-1 agreement with the float32
graph on held-out text (``quantize.agreement``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sokhan import SokhanError

OP, DOMAIN = "GroupQueryAttention", "com.microsoft"
K_SCALE, V_SCALE = 12, 13  # the node's input slots for the scales
HEADROOM = 1.25


def calibrate(decoder, sequences: Sequence[Sequence[int]], headroom: float = HEADROOM) -> dict[str, np.ndarray]:
    """Per-channel int8 scales (1, nh, 1, hs) float32 for every cache input of ``decoder``'s float32 step graph, from
    the keys and values it stores while stepping through ``sequences`` (each from an empty state)."""
    if not decoder.config.get("kv_share_buffer"):
        raise SokhanError("kvcache: the graph keeps its cache outside GroupQueryAttention; an int8 cache needs that node")
    peak: dict[str, np.ndarray] = {}
    for ids in sequences:
        state = decoder.init_state(1)
        for i in ids:
            _, state = decoder.step(np.array([i]), state)
        for spec, tensor in zip(decoder.specs, state.tensors):
            x = np.abs(tensor.numpy().astype(np.float64))  # (1, nh, P, hs)
            if spec.input.endswith(".key"):  # rotary pairs (i, i + hs/2): the pair's norm bounds either channel
                half = x.shape[-1] // 2
                norm = np.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)
                x = np.concatenate((norm, norm), axis=-1)
            m = x.max(axis=(0, 2), keepdims=True)
            peak[spec.input] = np.maximum(peak[spec.input], m) if spec.input in peak else m
    if not peak:
        raise SokhanError("kvcache: no calibration text")
    # A channel that stayed zero gets a tiny scale, not 0 (the kernel divides by it).
    return {name: (np.maximum(m, 1e-6) * headroom / 127.0).astype(np.float32) for name, m in peak.items()}


def quantize_cache(model, scales: dict[str, np.ndarray]) -> None:
    """Rewrite an onnx ``model`` in place: every ``GroupQueryAttention`` node keeps its cache as int8 with ``scales``
    (keyed by the cache's graph input, as ``calibrate`` returns them); the cache's graph inputs and outputs become
    int8."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    edges = {v.name: v for v in list(graph.input) + list(graph.output)}
    nodes = [n for n in graph.node if n.op_type == OP and n.domain == DOMAIN]
    if not nodes:
        raise SokhanError("kvcache: the graph has no GroupQueryAttention node to keep an int8 cache")
    for node in nodes:
        past, present = list(node.input[3:5]), list(node.output[1:3])
        for name in past + present:
            if name not in edges:
                raise SokhanError(f"kvcache: {node.name}: cache tensor {name!r} is not a graph input or output")
        missing = [p for p in past if p not in scales]
        if missing:
            raise SokhanError(f"kvcache: no calibrated scale for {', '.join(missing)}")
        for name in past + present:
            edges[name].type.tensor_type.elem_type = onnx.TensorProto.INT8
        stale = [v for v in graph.value_info if v.name in past + present]  # float32 annotations of the same tensors
        for v in stale:
            graph.value_info.remove(v)
        inputs = list(node.input) + [""] * (K_SCALE - len(node.input))
        for p in past:
            graph.initializer.append(numpy_helper.from_array(scales[p], f"{p}.scale"))
        inputs[K_SCALE:V_SCALE + 1] = [f"{p}.scale" for p in past]
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend([onnx.helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("kv_cache_bit_width", 8)])
