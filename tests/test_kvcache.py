"""The int8 KV cache of the transformer's int8 variant (``sokhan.export.kvcache``).

The node with an int8 cache is checked against the float64 reference attention over the dequantized cache, on fresh
random inputs: the appended key and value are the reference's, quantized (within one step of rounding), and the
output agrees to 5e-3 (ONNX Runtime's kernel does the arithmetic at lower precision than float32: ~1e-3 seen).
Calibration is checked for what it promises (no calibration value clipped, rotary pairs sharing a scale), and the
exported variant for what the runtime needs (int8 state at the graph's edges, in-place appends).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export_gqa import HS, MAX_LEN, NH, export_attention, reference, run_bound
from tiny_bundle import FULL, tiny_bundle

from sokhan import SokhanError
from sokhan.export.kvcache import HEADROOM, calibrate, quantize_cache
from sokhan.export.runtime import CacheLoop, Decoder
from sokhan.pipeline.models.layers import Rotary, apply_rotary


@pytest.fixture(scope="module")
def scales():
    rng = np.random.default_rng(3)
    return {name: rng.uniform(0.01, 0.05, (1, NH, 1, HS)).astype(np.float32) for name in ("past_key", "past_value")}


@pytest.fixture(scope="module")
def session(tmp_path_factory, scales):
    path = tmp_path_factory.mktemp("kv8") / "attention.onnx"
    export_attention(path)
    model = onnx.load(str(path))
    quantize_cache(model, scales)
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert [types[n] for n in ("past_key", "past_value", "present_key", "present_value")] == [onnx.TensorProto.INT8] * 4
    assert types["qkv"] == types["output"] == onnx.TensorProto.FLOAT
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def attend(qkv, keys, values, position):
    """float64 attention of qkv's rotated query (1, 1, 3C) over given keys and values (1, nh, P + 1, hs)."""
    rotary = Rotary(HS, MAX_LEN)
    q = torch.from_numpy(qkv[:, :, : NH * HS]).double().view(1, 1, NH, HS).transpose(1, 2)
    q = apply_rotary(q, rotary.cos.double()[position], rotary.sin.double()[position])
    k, v = torch.from_numpy(keys).double(), torch.from_numpy(values).double()
    y = ((q @ k.transpose(-2, -1)) / np.sqrt(HS)).softmax(-1) @ v  # (1, nh, 1, hs)
    return y.transpose(1, 2).reshape(1, 1, NH * HS).numpy()


def _check_rows(out, k, v, qkv, kq, vq, positions, scales):
    ks, vs = scales["past_key"], scales["past_value"]
    for b, p in enumerate(positions):
        # The reference attends over the dequantized past and the new key and value as the cache stores them.
        (_, k_ref, v_ref), = reference(qkv[b : b + 1], (kq[b : b + 1] * ks).astype(np.float64),
                                       (vq[b : b + 1] * vs).astype(np.float64), [p])
        k_new = np.clip(np.round(k_ref[:, :, p] / ks[:, :, 0]), -127, 127)
        v_new = np.clip(np.round(v_ref[:, :, p] / vs[:, :, 0]), -127, 127)
        assert np.abs(k[b, :, p] - k_new).max() <= 1 and np.abs(v[b, :, p] - v_new).max() <= 1
        np.testing.assert_array_equal(k[b, :, :p], kq[b, :, :p])  # the past is left as it was
        keys = np.concatenate((kq[b : b + 1, :, :p] * ks, k[b : b + 1, :, p : p + 1] * ks), axis=2)
        values = np.concatenate((vq[b : b + 1, :, :p] * vs, v[b : b + 1, :, p : p + 1] * vs), axis=2)
        np.testing.assert_allclose(out[b : b + 1], attend(qkv[b : b + 1], keys, values, p), atol=5e-3, rtol=0)


@pytest.mark.parametrize("batch,past", [(1, 0), (3, 5), (2, 17)])
def test_int8_node_with_a_past_of_the_filled_length(session, scales, batch, past):
    rng = np.random.default_rng(batch * 13 + past)
    qkv = rng.standard_normal((batch, 1, 3 * NH * HS)).astype(np.float32)
    kq, vq = (rng.integers(-127, 128, (batch, NH, past, HS)).astype(np.int8) for _ in range(2))
    out, k, v = session.run(None, {"qkv": qkv, "past_key": kq, "past_value": vq,
                                   "position_ids": np.full((batch, 1), past, dtype=np.int64)})
    assert k.dtype == v.dtype == np.int8 and k.shape == (batch, NH, past + 1, HS)
    _check_rows(out, k, v, qkv, kq, vq, [past] * batch, scales)


def test_int8_node_appends_in_place(session, scales):
    """One int8 buffer of 12 entries bound as past and present, rows at positions 0, 4 and 9 (CacheLoop's way)."""
    rng = np.random.default_rng(11)
    positions, capacity = [0, 4, 9], 12
    qkv = rng.standard_normal((3, 1, 3 * NH * HS)).astype(np.float32)
    kq, vq = (rng.integers(-127, 128, (3, NH, capacity, HS)).astype(np.int8) for _ in range(2))
    buf_k, buf_v = ort.OrtValue.ortvalue_from_numpy(kq.copy()), ort.OrtValue.ortvalue_from_numpy(vq.copy())
    out = run_bound(session, qkv, positions, (buf_k, buf_v), (buf_k, buf_v))
    _check_rows(out, buf_k.numpy(), buf_v.numpy(), qkv, kq, vq, positions, scales)


def test_calibration_bounds_every_value_it_saw():
    dec = Decoder(tiny_bundle("transformer"), provider="cpu")
    seqs = [dec.encode_prompt("we saw the big house with the good book", "en"), dec.encode_prompt("我 喜欢 看 书", "zh")]
    scales = calibrate(dec, seqs, headroom=1.0)
    assert set(scales) == {s.input for s in dec.specs}
    for ids in seqs:
        state = dec.init_state(1)
        for i in ids:
            _, state = dec.step(np.array([i]), state)
        for spec, t in zip(dec.specs, state.tensors):
            s = scales[spec.input]
            assert s.shape == (1, t.shape()[1], 1, t.shape()[3]) and s.dtype == np.float32
            assert (np.abs(t.numpy()) <= 127 * s * (1 + 1e-6)).all()  # nothing it saw would be clipped
            if spec.input.endswith(".key"):  # a rotary pair shares its scale: the bound holds at any position
                half = s.shape[-1] // 2
                np.testing.assert_array_equal(s[..., :half], s[..., half:])
    assert HEADROOM > 1


def test_calibration_and_rewrite_refuse_what_they_cannot_do():
    with pytest.raises(SokhanError, match="GroupQueryAttention"):
        calibrate(Decoder(tiny_bundle("mamba"), provider="cpu"), [[0, 1]])
    model = onnx.load(str(tiny_bundle("transformer") / "decoder.onnx"))
    with pytest.raises(SokhanError, match=r"no calibrated scale for past_key_values\.0\.key"):
        quantize_cache(model, {})
    mamba = onnx.load(str(tiny_bundle("mamba") / "decoder.onnx"))
    with pytest.raises(SokhanError, match="no GroupQueryAttention node"):
        quantize_cache(mamba, {})


def test_int8_variant_keeps_its_cache_in_int8(tmp_path):
    """The exported int8 transformer: int8 cache at the graph's edges, CacheLoop appends in place as the step API
    does, and greedy generate follows the variant's own greedy path."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("transformer", *FULL), bundle)
    report = json.loads((bundle / "parity.json").read_text())["variants"]["int8"]
    if not report["published"]:
        pytest.skip(f"the tiny int8 variant agreed on {report['top1_agreement']:.1%} only, below the target")
    dec = Decoder(bundle, provider="cpu", graph="decoder.int8.onnx")
    assert {s.dtype for s in dec.specs} == {"int8"}
    prompt = dec.encode_prompt("we saw the house", "en")
    logits, state = dec.prefill(prompt)
    assert {t.data_type() for t in state.tensors} == {"tensor(int8)"}
    loop = CacheLoop(dec.graph, state, capacity=state.position + 6)
    want = []
    for _ in range(6):
        token = int(logits[0].argmax())
        want.append(token)
        logits, state = dec.step(np.array([token]), state)
        np.testing.assert_allclose(loop.step(np.array([token])), logits, atol=1e-5, rtol=0)
    for a, b in zip(loop.state().tensors, state.tensors):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    if dec.eos not in want:
        assert dec.generate("we saw the house", max_new_tokens=len(want), lang="en") == dec.tokenizer.decode(want)
