"""ONNX Runtime's ``GroupQueryAttention`` contrib op (``com.microsoft``) for the transformer's one-token step.

Written out in plain ONNX ops, a step's attention concatenates ``past_key_values`` and the new key into a new
``present`` tensor: a copy of the whole cache at every token, plus some thirty small nodes per layer for the
rotary, the mask and the head reshapes. ``GroupQueryAttention`` does the rotary, the append and the masked
attention in one node, and when the caller binds the same buffer as ``past`` and ``present`` (capacity
``max_length`` along the sequence axis) it writes the new key and value in place: the loop onnxruntime-genai runs. Without shared buffers it
behaves as the written-out graph does (``present`` = ``past`` + 1 entries), so one graph serves both.

How the graph says where a row is: ``seqlens_k`` (B,) int32 is the index of the row's newest token (its
``position_id``), ``total_sequence_length`` the longest row's length. The key at sequence index j of a row has
position j, as in ``forward_with_past``.

ONNX Runtime's kernel takes head sizes that are multiples of 16 (``usable``); a model with other heads keeps the
written-out attention and the step API.

The export traces ``group_query_attention``, a torch custom op whose eager body is the same computation in
PyTorch (the written-out reference), and the exporter's translation table maps it onto the contrib node.
"""

from __future__ import annotations

import math

import torch

from sokhan.pipeline.models.layers import apply_rotary

OP, DOMAIN = "GroupQueryAttention", "com.microsoft"


def usable(head_dim: int) -> bool:
    """Whether ONNX Runtime's kernel takes this head size ("head_size shall be a multiple of 16")."""
    return head_dim % 16 == 0


@torch.library.custom_op("sokhan::group_query_attention", mutates_args=())
def group_query_attention(
    qkv: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, 1, 3C) of one new token per row, past k/v (B, nh, P, hs), seqlens_k (B,) int32 = the new token's
    position, total_sequence_length () int32 = max(seqlens_k) + 1, cos/sin_cache (max_seq_len, hs/2).

    Returns the attended values (B, 1, C) (heads side by side) and the present k/v (B, nh, P + 1, hs).
    """
    B, T, three_c = qkv.shape
    hs = three_c // 3 // num_heads
    q, k, v = (t.view(B, T, num_heads, hs).transpose(1, 2) for t in qkv.split(three_c // 3, dim=2))  # (B, nh, 1, hs)
    pos = seqlens_k.long()[:, None]  # (B, 1)
    cos, sin = cos_cache[pos].unsqueeze(1), sin_cache[pos].unsqueeze(1)  # (B, 1, 1, hs/2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    key, value = torch.cat((past_key, k), dim=2), torch.cat((past_value, v), dim=2)  # (B, nh, P + 1, hs)
    # With past_key_values of one length P for every row, as the step contract has it, every key is visible.
    scores = (q @ key.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, 1, P + 1)
    y = scores.softmax(dim=-1) @ value  # (B, nh, 1, hs)
    return y.transpose(1, 2).reshape(B, T, num_heads * hs), key, value


@group_query_attention.register_fake
def _(qkv, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache, num_heads):
    B, T, three_c = qkv.shape
    present = past_key.new_empty((B, past_key.shape[1], past_key.shape[2] + T, past_key.shape[3]))
    return qkv.new_empty((B, T, three_c // 3)), present, torch.empty_like(present)


def _register_schema() -> None:
    """Tell onnx (and so onnxscript, which builds nodes from schemas) the op's signature, as far as used here.

    ONNX Runtime's contrib schemas live in its own registry, not in onnx's. Inputs after ``sin_cache`` (position
    ids, attention bias, head sink) are left out: the node never names them.
    """
    import onnx.defs
    import onnx.helper
    from onnx.defs import OpSchema

    if onnx.defs.has(OP, DOMAIN):
        return
    opt = OpSchema.FormalParameterOption.Optional
    inputs = [OpSchema.FormalParameter("query", "T"), OpSchema.FormalParameter("key", "T", param_option=opt),
              OpSchema.FormalParameter("value", "T", param_option=opt),
              OpSchema.FormalParameter("past_key", "T", param_option=opt),
              OpSchema.FormalParameter("past_value", "T", param_option=opt),
              OpSchema.FormalParameter("seqlens_k", "M"), OpSchema.FormalParameter("total_sequence_length", "M"),
              OpSchema.FormalParameter("cos_cache", "T", param_option=opt),
              OpSchema.FormalParameter("sin_cache", "T", param_option=opt)]
    outputs = [OpSchema.FormalParameter(n, "T") for n in ("output", "present_key", "present_value")]
    attrs = [OpSchema.Attribute(n, OpSchema.AttrType.INT, "") for n in ("num_heads", "kv_num_heads")]
    attrs += [OpSchema.Attribute(n, onnx.helper.make_attribute(n, 0), "") for n in ("do_rotary", "rotary_interleaved")]
    onnx.defs.register_schema(OpSchema(
        OP, DOMAIN, 1, inputs=inputs, outputs=outputs, attributes=attrs,
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
    ))


def _translate(qkv, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache, num_heads: int):
    """The op as one ``com.microsoft.GroupQueryAttention`` node: packed q/k/v in, rotate-half rotary inside."""
    import onnxscript

    _register_schema()
    msft = onnxscript.values.Opset(DOMAIN, 1)
    return msft.GroupQueryAttention(
        qkv, None, None, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
        num_heads=num_heads, kv_num_heads=num_heads, do_rotary=1, rotary_interleaved=0, _outputs=3,
    )


TRANSLATION = {torch.ops.sokhan.group_query_attention.default: _translate}
