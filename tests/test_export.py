"""ONNX export of the decode step: graph interface, dynamic axes, self-contained file, metadata, the export stage.

The bundles come from the real export stage on a tiny run (``tiny_bundle``), built once per test process.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from sokhan import CheckFailed, SokhanError
from sokhan.export.onnx import METADATA_KEY
from sokhan.export.runtime import open_session
from sokhan.pipeline.stage import run_stage
from sokhan.pipeline.train.checkpoint import load_model
from tiny_bundle import FULL, config, tampered, tiny_bundle, tiny_run

ARCHS = ["mamba", "transformer"]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


def graph_io(path):
    s = open_session(path, "cpu")
    return {i.name: i.shape for i in s.get_inputs()}, {o.name: o.shape for o in s.get_outputs()}


def test_bundle_holds_every_file(arch):
    bundle = tiny_bundle(arch)
    for name in ("decoder.onnx", "tokenizer.json", "segmenter.json", "config.json", "parity.json", "README.md"):
        assert (bundle / name).is_file(), name
    # Weights inside the one file: no external-data side files, no initializer pointing outside.
    assert sorted(p.name for p in bundle.iterdir()) == sorted(
        ["decoder.onnx", "tokenizer.json", "segmenter.json", "config.json", "parity.json", "README.md"]
    )
    model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["arch"] == arch and cfg["opset"] == 18 and cfg["sokhan_version"]
    assert "<|eos|>" in cfg["special_tokens"] and "<|lang:fa|>" in cfg["special_tokens"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[METADATA_KEY])["state"] == cfg["state"]
    assert model.opset_import[0].version == 18
    # The transformer's step can append to its caches in place (GroupQueryAttention); the bundle says so and how.
    assert cfg["kv_share_buffer"] == (arch == "transformer")
    assert ("GroupQueryAttention" in (bundle / "README.md").read_text()) == (arch == "transformer")
    # The README names the languages the model was trained on (config.json's), not all three whatever they were.
    names = {"fa": "Persian", "zh": "Chinese", "en": "English"}
    readme = (bundle / "README.md").read_text()
    assert f"{' / '.join(names[lang] for lang in cfg['languages'])} next-token" in readme
    assert all((f"<|lang:{lang}|>" in readme) == (lang in cfg["languages"]) for lang in names)


def test_mamba_graph_names_and_dynamic_axes():
    bundle = tiny_bundle("mamba")
    inputs, outputs = graph_io(bundle / "decoder.onnx")
    d_inner, d_conv, n = 64, 4, 16
    assert inputs["input_ids"] == ["batch", 1]
    assert list(outputs)[0] == "logits" and outputs["logits"][0] == "batch"
    for i in range(2):
        assert inputs[f"past_key_values.{i}.conv_state"] == ["batch", d_inner, d_conv]
        assert inputs[f"past_key_values.{i}.recurrent_state"] == ["batch", d_inner, n]
        assert outputs[f"present.{i}.conv_state"] == ["batch", d_inner, d_conv]
        assert outputs[f"present.{i}.recurrent_state"] == ["batch", d_inner, n]
    assert len(inputs) == 5 and len(outputs) == 5


def test_transformer_graph_names_and_dynamic_axes():
    bundle = tiny_bundle("transformer")
    inputs, outputs = graph_io(bundle / "decoder.onnx")
    assert inputs["input_ids"] == ["batch", 1] and inputs["position_ids"] == ["batch", 1]
    for i in range(2):
        for kv in ("key", "value"):
            assert inputs[f"past_key_values.{i}.{kv}"] == ["batch", 2, "past", 16]
            assert outputs[f"present.{i}.{kv}"] == ["batch", 2, "past + 1", 16]


def _torch_state(model, arch, batch, steps, g):
    """A state after ``steps`` random tokens in PyTorch, and the same state as graph inputs."""
    state = model.init_state(batch, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for _ in range(steps):
            _, state = model.step(torch.randint(0, model.config.vocab_size, (batch,), generator=g), state)
    if arch == "mamba":
        return state, [t.numpy().copy() for t in state.tensors()]
    pos = int(state.position)
    return state, [t[:, :, :pos].numpy().copy() for kv in zip(state.keys, state.values) for t in kv]


@pytest.mark.parametrize("batch,past", [(1, 0), (3, 0), (1, 5), (3, 7)])
def test_graph_matches_step_at_any_batch_and_past(arch, batch, past):
    """Example sizes were 2 and 3; batch 1 and 3, past 0 and longer run and agree with PyTorch step (fp32: 1e-4)."""
    bundle = tiny_bundle(arch)
    model, mcfg = load_model(tiny_run(arch) / "train")
    cfg = json.loads((bundle / "config.json").read_text())
    session = open_session(bundle / "decoder.onnx", "cpu")
    g = torch.Generator().manual_seed(batch * 100 + past)
    state, feeds = _torch_state(model, arch, batch, past, g)
    ids = torch.randint(0, mcfg.vocab_size, (batch,), generator=g)
    with torch.no_grad():
        want, state = model.step(ids, state)
    feed = {"input_ids": ids.numpy()[:, None]} | {s["input"]: v for s, v in zip(cfg["state"], feeds)}
    if arch == "transformer":
        feed["position_ids"] = np.full((batch, 1), past, dtype=np.int64)
    out = session.run(None, feed)
    np.testing.assert_allclose(out[0], want.numpy(), atol=1e-4, rtol=0)
    assert out[0].shape == (batch, mcfg.vocab_size)
    if arch == "mamba":
        for got, ref in zip(out[1:], state.tensors()):
            np.testing.assert_allclose(got, ref.numpy(), atol=1e-5, rtol=0)
    else:
        assert out[1].shape == (batch, 2, past + 1, 16)
        np.testing.assert_allclose(out[1], state.keys[0][:, :, : past + 1].numpy(), atol=1e-5, rtol=0)


def test_transformer_prefill_graph_matches_stepping():
    bundle = tiny_bundle("transformer", *FULL)
    assert (bundle / "prefill.onnx").is_file()
    assert json.loads((bundle / "config.json").read_text())["prefill"] == "prefill.onnx"
    model, mcfg = load_model(tiny_run("transformer") / "train")
    ids = torch.randint(0, mcfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(3))
    session = open_session(bundle / "prefill.onnx", "cpu")
    out = session.run(None, {"input_ids": ids.numpy(), "position_ids": np.tile(np.arange(9), (3, 1))})
    with torch.no_grad():
        logits, state = model.prefill(ids)
    np.testing.assert_allclose(out[0], logits[:, -1].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[1], state.keys[0][:, :, :9].numpy(), atol=1e-5, rtol=0)


def test_parity_json_records_the_check(arch):
    report = json.loads((tiny_bundle(arch) / "parity.json").read_text())
    assert report["passed"] and report["tokens_identical"]
    assert report["max_abs_diff"] <= 1e-4
    assert report["providers"] == ["CPUExecutionProvider"] or "CUDAExecutionProvider" in report["providers"]
    assert set(report["languages"]) == {"fa", "zh", "en"}
    for lang in report["languages"].values():
        assert lang["steps"] == 64 and len(lang["max_abs_diff_per_step"]) == 64 and len(lang["tokens"]) == 64


def test_quantized_and_fp16_variants_judged_by_agreement():
    bundle = tiny_bundle("transformer", *FULL)
    report = json.loads((bundle / "parity.json").read_text())
    cfg = json.loads((bundle / "config.json").read_text())
    for name, file in (("fp16", "decoder.fp16.onnx"), ("int8", "decoder.int8.onnx")):
        v = report["variants"][name]
        assert v["positions"] > 100
        assert v["published"] == (v["top1_agreement"] >= 0.95)
        assert (bundle / file).is_file() == v["published"] and (cfg["variants"].get(name) == file) == v["published"]
        # A variant is a different graph: its logits are not bit-identical to fp32.
        assert v["max_abs_logit_diff"] > 0
        if v["published"]:  # its size as published (it was measured before the final metadata went in)
            assert v["bytes"] == (bundle / file).stat().st_size
    int8 = onnx.load(str(bundle / "decoder.int8.onnx"))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in int8.graph.node)
    # Every graph's metadata is the final config (it said "variants": {}), with the graph's own state dtypes (the
    # fp16 and int8 graphs claimed a float32 state).
    want = {"decoder.onnx": "float32", "decoder.fp16.onnx": "float16", "decoder.int8.onnx": "int8"}
    for file in ["decoder.onnx", *cfg["variants"].values()]:
        meta = json.loads({p.key: p.value for p in onnx.load(str(bundle / file)).metadata_props}["sokhan.config"])
        assert meta["variants"] == cfg["variants"], file
        assert {e["dtype"] for e in meta["state"]} == {want[file]}, file


def test_int8_quantization_of_the_mamba_step(tmp_path):
    """Quantizing the Mamba graph (its shape annotations once broke the quantizer) gives a runnable, close graph."""
    from sokhan.export.quantize import agreement, to_int8
    from sokhan.export.runtime import Decoder

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("mamba"), bundle)
    to_int8(bundle / "decoder.onnx", bundle / "decoder.int8.onnx")
    assert sorted(p.name for p in bundle.iterdir() if p.name.startswith(".")) == []
    fp32, int8 = Decoder(bundle, provider="cpu"), Decoder(bundle, provider="cpu", graph="decoder.int8.onnx")
    result = agreement(fp32, int8, [fp32.encode_prompt("we saw the big house with the good book", "en")])
    assert 0 < result["max_abs_logit_diff"] < 1.0 and result["top1_agreement"] >= 0.8


def test_failed_parity_publishes_no_bundle(monkeypatch):
    """A graph that disagrees with PyTorch (one weight changed before tracing) fails the stage; nothing published."""
    from sokhan.export import onnx as onnx_export

    run = tiny_run("mamba")
    monkeypatch.setattr(onnx_export, "export_decoder", tampered(onnx_export.export_decoder))
    before = (run / "export").exists() and json.loads((run / "export" / "manifest.json").read_text())["fingerprint"]
    with pytest.raises(CheckFailed, match="parity failed") as failure:
        run_stage("export", config("mamba", "export.parity_steps=8"), run, force=True)
    assert failure.value.exit_code == 1  # the CLI's status: a failed check, not bad input (2)
    assert not (run / "export.partial").exists()
    after = (run / "export").exists() and json.loads((run / "export" / "manifest.json").read_text())["fingerprint"]
    assert before == after  # the previous bundle (if any) is untouched
    failed = json.loads((run / "export.parity-failed.json").read_text())
    assert not failed["passed"] and failed["max_abs_diff"] > 1e-4
    assert "first differing greedy token at step" in str(failure.value) or "the greedy tokens agree" in str(failure.value)
    # The next export that passes takes the failed attempt's report away (it stayed beside the new bundle).
    monkeypatch.undo()
    run_stage("export", config("mamba", "export.parity_steps=8"), run, force=True)
    assert not (run / "export.parity-failed.json").exists()


def test_export_flags_enter_the_config():
    from sokhan.pipeline.cli import build_parser

    args = build_parser().parse_args(["export", "--run-dir", "r", "--prefill", "--quantize", "int8", "--precision", "fp16"])
    assert args.overrides == ["export.prefill=true", "export.quantize=int8", "export.precision=fp16"]


def test_bad_export_config_is_one_line():
    with pytest.raises(SokhanError, match="export.parity_atol"):
        config("mamba", "export.parity_atol=0")
    with pytest.raises(SokhanError, match="export.quantize"):
        config("mamba", "export.quantize=int4")
