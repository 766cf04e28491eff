"""Smaller graphs from the float32 step: float16 weights, or int8 dynamic quantization, judged by agreement.

A variant is judged by what it is for, the tokens it picks: on held-out text fed to both graphs (teacher forcing),
the fraction of positions where its argmax equals the float32 graph's. Logit tolerances say little here: int8
shifts every logit a little and is still useful if the ranking at the top holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from sokhan.export.runtime import Decoder

FP16 = "decoder.fp16.onnx"
INT8 = "decoder.int8.onnx"


def to_fp16(src: Path, dst: Path) -> None:
    """Weights, arithmetic and the state in float16; the logits stay float32.

    The state tensors are float16 at the graph's edges too: the graph computes them in float16 anyway, and a
    float32 state would be cast in and out every step, copying a KV cache twice a token and keeping the cache
    from being appended in place (``runtime.CacheLoop``). The runtime takes each state tensor's type from the
    graph it opens.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=["logits"], disable_shape_infer=False)
    tmp = dst.with_name(f".{dst.name}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dst)


def to_int8(src: Path, dst: Path, kv_scales: dict[str, np.ndarray] | None = None, per_channel: bool = True) -> None:
    """Dynamic int8 quantization of the MatMul/Gemm weights (activations quantized per call, on the fly); with
    ``kv_scales`` (``kvcache.calibrate``) the transformer's KV cache is int8 too (``kvcache.quantize_cache``).

    Weights get a scale per output channel, not one per matrix: on the trained corpora models one scale per matrix
    kept top-1 agreement with float32 at 94.0 % (transformer) and 89.8 % (Mamba), below the 95 % a variant needs;
    per channel, 99.2 % and 96.1 % (``benchmarks/int8_agreement.py``), at some cost in speed at short contexts
    (``benchmarks/README.md``, "Decode latency").
    """
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = dst.with_name(f".{dst.name}.tmp")
    # The exporter's intermediate shape annotations can disagree with what the quantizer's shape inference derives
    # after its own rewrites (seen on the Mamba step: "Inferred shape and existing shape differ"); it re-infers them.
    model = onnx.load(str(src))
    del model.graph.value_info[:]
    _untie(model.graph)
    plain = dst.with_name(f".{dst.name}.src.onnx")
    onnx.save(model, str(plain))
    # quantize_dynamic logs a pre-processing hint on the root logger at WARNING for every call; it is advice only.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        # onnx's shape inference knows no types for the outputs of the transformer's contrib attention node
        # (sokhan.export.gqa); everything in these graphs is float32, so that is the type the quantizer may assume.
        quantize_dynamic(str(plain), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel, op_types_to_quantize=["MatMul", "Gemm"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
        plain.unlink(missing_ok=True)
    if kv_scales is not None:
        from sokhan.export.kvcache import quantize_cache

        model = onnx.load(str(tmp))
        quantize_cache(model, kv_scales)
        onnx.save(model, str(tmp))
    tmp.replace(dst)


def _untie(graph) -> None:
    """Give every extra user of a shared weight matrix its own copy.

    The quantizer folds a weight's Transpose into the initializer itself; a tied embedding (read by Gather and by
    the output MatMul) then reaches the Gather transposed, and ONNX Runtime rejects the graph.
    """
    import onnx

    matrices = {t.name: t for t in graph.initializer if len(t.dims) == 2}
    seen: dict[str, int] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in matrices:
                seen[name] = seen.get(name, 0) + 1
                if seen[name] > 1:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(matrices[name])
                    copy.name = f"{name}.use{seen[name]}"
                    graph.initializer.append(copy)
                    node.input[i] = copy.name


def agreement(reference: Decoder, variant: Decoder, sequences: Sequence[Sequence[int]]) -> dict[str, float]:
    """Top-1 agreement of ``variant`` with ``reference`` over every position of ``sequences`` (teacher forcing)."""
    same = total = 0
    worst = 0.0
    for ids in sequences:
        sa, sb = reference.init_state(1), variant.init_state(1)
        for i in ids:
            la, sa = reference.step(np.array([i]), sa)
            lb, sb = variant.step(np.array([i]), sb)
            same += int(la[0].argmax() == lb[0].argmax())
            total += 1
            worst = max(worst, float(np.abs(la - lb).max()))
    return {"positions": total, "top1_agreement": same / max(total, 1), "max_abs_logit_diff": worst}
