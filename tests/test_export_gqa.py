"""The transformer step's attention as ONNX Runtime's GroupQueryAttention node (``sokhan.export.gqa``).

The node is checked against the op's eager body in float64 on fresh random inputs (float32 graph: 1e-5), in the
three ways the runtime drives it: a past of the filled length (the step API), one buffer bound as past and
present with rows at different positions (CacheLoop), and separate past and present buffers of that capacity
(what a provider that copies its inputs sees). The eager body is in turn checked against the model's own
``forward_with_past``, so the graph computes what training did.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sokhan.export.gqa import group_query_attention
from sokhan.export.onnx import export_graph
from sokhan.pipeline.models import ModelConfig, build
from sokhan.pipeline.models.layers import Rotary

NH, HS, MAX_LEN = 2, 16, 32


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rotary = Rotary(HS, MAX_LEN)

    def forward(self, qkv, past_key, past_value, position_ids):
        seqlens_k = position_ids[:, -1].to(torch.int32)
        total = (seqlens_k.max() + 1).to(torch.int32)
        return group_query_attention(qkv, past_key, past_value, seqlens_k, total, self.rotary.cos, self.rotary.sin, NH)


def export_attention(path) -> None:
    """The op alone as an ONNX graph: qkv, past_key, past_value, position_ids -> output, present_key, present_value."""
    from torch.export import Dim

    batch, past = Dim("batch", min=1, max=64), Dim("past", min=0, max=MAX_LEN - 1)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 1, 3 * NH * HS, generator=g), torch.randn(2, NH, 3, HS, generator=g),
            torch.randn(2, NH, 3, HS, generator=g), torch.full((2, 1), 3))
    dynamic = {"qkv": {0: batch}, "past_key": {0: batch, 2: past}, "past_value": {0: batch, 2: past},
               "position_ids": {0: batch}}
    export_graph(Attention().eval(), args, dynamic, ["qkv", "past_key", "past_value", "position_ids"],
                 ["output", "present_key", "present_value"], path, opset=18)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa") / "attention.onnx"
    export_attention(path)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("GroupQueryAttention") == 1
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_bound(session, qkv, positions, past, present) -> np.ndarray:
    """One run with the caches bound as given ``OrtValue``s (past and present may be the same buffers); the output."""
    io = session.io_binding()
    io.bind_cpu_input("qkv", qkv)
    io.bind_cpu_input("position_ids", np.array(positions, dtype=np.int64)[:, None])
    for name, value in zip(("past_key", "past_value"), past):
        io.bind_ortvalue_input(name, value)
    io.bind_output("output", "cpu")
    for name, value in zip(("present_key", "present_value"), present):
        io.bind_ortvalue_output(name, value)
    session.run_with_iobinding(io)
    return io.get_outputs()[0].numpy()


def reference(qkv, keys, values, positions):
    """Row by row in float64: row b attends to keys[b, :, :positions[b]] and its own new key."""
    rotary = Rotary(HS, MAX_LEN)
    cos, sin = rotary.cos.double(), rotary.sin.double()  # the float32 tables the graph holds, widened
    out = []
    for b, p in enumerate(positions):
        y, k, v = group_query_attention(
            torch.from_numpy(qkv[b : b + 1]).double(), torch.from_numpy(keys[b : b + 1, :, :p]).double(),
            torch.from_numpy(values[b : b + 1, :, :p]).double(), torch.tensor([p], dtype=torch.int32),
            torch.tensor(p + 1, dtype=torch.int32), cos, sin, NH)
        out.append((y.numpy(), k.numpy(), v.numpy()))
    return out


def _inputs(rng, batch, length):
    qkv = rng.standard_normal((batch, 1, 3 * NH * HS)).astype(np.float32)
    keys, values = (rng.standard_normal((batch, NH, length, HS)).astype(np.float32) for _ in range(2))
    return qkv, keys, values


@pytest.mark.parametrize("batch,past", [(1, 0), (3, 5), (2, 17)])
def test_node_with_a_past_of_the_filled_length(session, batch, past):
    rng = np.random.default_rng(batch * 31 + past)
    qkv, keys, values = _inputs(rng, batch, past)
    out, k, v = session.run(None, {"qkv": qkv, "past_key": keys, "past_value": values,
                                   "position_ids": np.full((batch, 1), past, dtype=np.int64)})
    assert k.shape == (batch, NH, past + 1, HS)
    for b, (y_ref, k_ref, v_ref) in enumerate(reference(qkv, keys, values, [past] * batch)):
        np.testing.assert_allclose(out[b : b + 1], y_ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(k[b : b + 1], k_ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(v[b : b + 1], v_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shared", [True, False], ids=["one-buffer", "separate-buffers"])
def test_node_appends_into_a_buffer_of_fixed_capacity(session, shared):
    """Rows at positions 0, 4 and 9 of a 12-entry cache: each sees only its own filled entries."""
    rng = np.random.default_rng(7 + shared)
    positions, capacity = [0, 4, 9], 12
    qkv, keys, values = _inputs(rng, len(positions), capacity)
    before_k, before_v = keys.copy(), values.copy()
    past_k, past_v = ort.OrtValue.ortvalue_from_numpy(keys), ort.OrtValue.ortvalue_from_numpy(values)
    present_k = past_k if shared else ort.OrtValue.ortvalue_from_numpy(np.zeros_like(keys))
    present_v = past_v if shared else ort.OrtValue.ortvalue_from_numpy(np.zeros_like(values))
    out = run_bound(session, qkv, positions, (past_k, past_v), (present_k, present_v))
    k, v = present_k.numpy(), present_v.numpy()
    for b, (p, (y_ref, k_ref, v_ref)) in enumerate(zip(positions, reference(qkv, before_k, before_v, positions))):
        np.testing.assert_allclose(out[b : b + 1], y_ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(k[b : b + 1, :, : p + 1], k_ref, atol=1e-5, rtol=0)
        np.testing.assert_allclose(v[b : b + 1, :, : p + 1], v_ref, atol=1e-5, rtol=0)


def test_eager_body_is_the_models_attention():
    """The op's body (the graph's reference) equals CausalSelfAttention.forward_with_past on one new token."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="transformer", preset="tiny", d_model=32, n_layers=1, n_heads=4).resolve(50)
    model = build(cfg).eval().double()
    attn = model.layers[0].attn
    B, P = 3, 6
    x = torch.randn(B, 1, cfg.d_model, dtype=torch.float64)
    past = (torch.randn(B, 4, P, 8, dtype=torch.float64), torch.randn(B, 4, P, 8, dtype=torch.float64))
    position_ids = torch.full((B, 1), P)
    cos, sin = model.rotary.tables(position_ids)
    from sokhan.pipeline.models.transformer import attention_mask

    with torch.no_grad():
        want, (k_want, v_want) = attn.forward_with_past(x, cos.double(), sin.double(), past, attention_mask(position_ids, P + 1))
        y, k, v = group_query_attention(attn.c_attn(x), *past, torch.full((B,), P, dtype=torch.int32),
                                        torch.tensor(P + 1, dtype=torch.int32), model.rotary.cos.double(),
                                        model.rotary.sin.double(), 4)
        got = attn.c_proj(y)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(k, k_want, atol=1e-12, rtol=0)
    torch.testing.assert_close(v, v_want, atol=1e-12, rtol=0)


def test_heads_the_kernel_does_not_take_keep_the_written_out_attention(tmp_path):
    """Head size 8 (not a multiple of 16): concatenation in the graph, no in-place loop in the config, same logits."""
    from sokhan.export.onnx import bundle_config, export_decoder

    torch.manual_seed(0)
    cfg = ModelConfig(arch="transformer", preset="tiny", d_model=32, n_layers=1, n_heads=4).resolve(50)
    model = build(cfg).eval()
    export_decoder(model, cfg, tmp_path / "decoder.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "decoder.onnx")).graph.node]
    assert "GroupQueryAttention" not in ops and "Concat" in ops
    assert not bundle_config(cfg, {}, 18, prefill=False)["kv_share_buffer"]
    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    state = model.init_state(2)
    with torch.no_grad():
        model.step(torch.tensor([3, 4]), state)
        want, _ = model.step(torch.tensor([5, 6]), state)
    feed = {"input_ids": np.array([[5], [6]]), "position_ids": np.full((2, 1), 1),
            "past_key_values.0.key": state.keys[0][:, :, :1].numpy(), "past_key_values.0.value": state.values[0][:, :, :1].numpy()}
    np.testing.assert_allclose(session.run(["logits"], feed)[0], want.numpy(), atol=1e-5, rtol=0)


def test_step_graph_attends_through_one_node_per_layer():
    from tiny_bundle import tiny_bundle

    ops = [n.op_type for n in onnx.load(str(tiny_bundle("transformer") / "decoder.onnx")).graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Concat" not in ops
