"""The Mamba prefill graph (``prefill.onnx``): a whole prompt through one ONNX ``Scan`` per layer, T dynamic.

Checked against ``MambaLM.prefill`` (PyTorch float32, the truth) at several prompt lengths and batch sizes; the state
it returns must carry on through the step graph exactly as a token-by-token state does; the export stage with
``--prefill`` publishes it in a Mamba bundle whose parity check runs it, and ``Decoder.generate`` uses it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sokhan import CheckFailed
from sokhan.export.onnx import export_decoder, state_layout
from sokhan.export.prefill import export_prefill
from sokhan.export.runtime import Decoder, open_session
from sokhan.kernels.selective_scan.reference import selective_scan_ref
from sokhan.kernels.selective_scan.scan_hop import selective_scan_hop
from sokhan.pipeline.models import ModelConfig, build
from tiny_bundle import config, tampered, tiny_run

ATOL = 1e-4  # float32 graph against float32 PyTorch: logits O(1), states O(0.1..1)
VOCAB = 101
D_CONV = 4
LENGTHS = [1, 2, 3, 5, 37]  # 1..3 < d_conv (the conv state is partly the fresh state's zeros); 5 and 37 beyond it


@pytest.fixture(scope="module", params=[True, False], ids=["selective", "lti"])
def graphs(request, tmp_path_factory):
    """A fresh random Mamba (selective or the LTI ablation), its prefill and step graphs exported."""
    torch.manual_seed(1)
    # Δ in [0.1, 1] rather than the default [0.001, 0.1]: one token moves the SSM state by O(0.1), not O(0.001),
    # so ATOL is small against what the test compares.
    cfg = ModelConfig(arch="mamba", d_model=32, n_layers=2, d_conv=D_CONV, dt_min=0.1, dt_max=1.0, selective=request.param).resolve(VOCAB)
    model = build(cfg).eval()
    with torch.no_grad():  # spread the logits (embeddings start at std 0.02) and make the channels' A differ
        model.get_input_embeddings().weight.mul_(20.0)
        for layer in model.backbone.layers:
            layer.mixer.A_log.add_(0.3 * torch.randn_like(layer.mixer.A_log))
    out = tmp_path_factory.mktemp("prefill")
    export_prefill(model, cfg, out / "prefill.onnx")
    export_decoder(model, cfg, out / "decoder.onnx")
    return model, cfg, out


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_graph_has_a_dynamic_prompt_axis_and_one_scan_per_layer(graphs):
    _, cfg, out = graphs
    graph = onnx.load(str(out / "prefill.onnx")).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert [i.name for i in graph.input] == ["input_ids"] and dims == ["batch", "seq"]
    assert [o.name for o in graph.output] == ["logits"] + [s["output"] for s in state_layout(cfg)]
    # The recurrence is a Scan, not a loop unrolled for the example's 5 tokens.
    assert sum(n.op_type == "Scan" for n in graph.node) == cfg.n_layers
    assert not any(n.op_type == "Loop" for n in graph.node)


@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_graph_matches_torch_prefill(graphs, batch):
    """Last logits and every state tensor within ATOL of ``MambaLM.prefill``, T = 1..37 (example was 2 x 5)."""
    model, cfg, out = graphs
    session = open_session(out / "prefill.onnx", "cpu")
    for length in LENGTHS:
        ids = _ids(batch, length, seed=batch * 1000 + length)
        got = session.run(None, {"input_ids": ids.numpy()})
        with torch.no_grad():
            logits, state = model.prefill(ids)
        assert got[0].shape == (batch, VOCAB)
        np.testing.assert_allclose(got[0], logits[:, -1].numpy(), atol=ATOL, rtol=0, err_msg=f"logits, T={length}")
        for spec, g, want in zip(state_layout(cfg), got[1:], state.tensors()):
            assert g.shape == tuple(want.shape)
            np.testing.assert_allclose(g, want.numpy(), atol=ATOL, rtol=0, err_msg=f"{spec['output']}, T={length}")
        assert min(np.abs(g).max() for g in got[1:]) > 100 * ATOL  # states with content, not zeros or near it


def _step(session, cfg: ModelConfig, token: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    feed = {"input_ids": token[:, None]} | {s["input"]: v for s, v in zip(state_layout(cfg), state)}
    logits, *new = session.run(None, feed)
    return logits, new


def test_stepping_from_the_prefill_state_matches_stepping_from_a_stepped_state(graphs):
    """decoder.onnx continued from prefill.onnx's state gives the logits of decoder.onnx fed the prompt token by token."""
    _, cfg, out = graphs
    prefill, step = open_session(out / "prefill.onnx", "cpu"), open_session(out / "decoder.onnx", "cpu")
    batch, prompt, more = 2, 6, 5
    ids = _ids(batch, prompt + more, seed=7).numpy()
    fused_logits, *fused = prefill.run(None, {"input_ids": ids[:, :prompt]})
    stepped = [np.zeros([batch, *s["shape"][1:]], dtype=np.float32) for s in state_layout(cfg)]
    for t in range(prompt):
        stepped_logits, stepped = _step(step, cfg, ids[:, t], stepped)
    np.testing.assert_allclose(fused_logits, stepped_logits, atol=ATOL, rtol=0)
    for a, b in zip(fused, stepped):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    for t in range(prompt, prompt + more):
        fused_logits, fused = _step(step, cfg, ids[:, t], fused)
        stepped_logits, stepped = _step(step, cfg, ids[:, t], stepped)
        np.testing.assert_allclose(fused_logits, stepped_logits, atol=ATOL, rtol=0, err_msg=f"step {t}")


@pytest.mark.parametrize("grouped", [False, True])
def test_scan_formulation_matches_the_sequential_reference_in_float64(grouped):
    """``selective_scan_hop`` (eager, float64) against ``selective_scan_ref``: 1e-12, ungrouped and grouped B, C."""
    g = torch.Generator().manual_seed(5)
    bt, dim, n, length = 2, 6, 3, 7
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u, delta, z = rand(bt, dim, length), rand(bt, dim, length), rand(bt, dim, length)
    bc = (bt, 3, n, length) if grouped else (bt, n, length)
    B, C = rand(*bc), rand(*bc)
    A, D, bias = -torch.rand(dim, n, generator=g, dtype=torch.float64) - 0.1, rand(dim), rand(dim)
    args = dict(D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
    want, want_last = selective_scan_ref(u, delta, A, B, C, **args)
    got, got_last = selective_scan_hop(u, delta, A, B, C, **args)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got_last, want_last, atol=1e-12, rtol=0)


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory) -> Path:
    """``sokhan export --prefill`` through the CLI on a copy of the tiny Mamba run."""
    from sokhan.pipeline.cli import main
    from sokhan.pipeline.stage import save_run_config

    run = tmp_path_factory.mktemp("cli") / "run"
    shutil.copytree(tiny_run("mamba"), run)
    save_run_config(run, config("mamba"))
    assert main(["export", "--run-dir", str(run), "--prefill", "--force"]) == 0
    return run / "export" / "bundle"


def test_export_stage_publishes_a_mamba_prefill_graph_that_passes_parity(cli_bundle):
    cfg = json.loads((cli_bundle / "config.json").read_text())
    assert cfg["arch"] == "mamba" and cfg["prefill"] == "prefill.onnx" and not cfg["uses_position_ids"]
    model = onnx.load(str(cli_bundle / "prefill.onnx"))
    assert json.loads({p.key: p.value for p in model.metadata_props}["sokhan.config"])["state"] == cfg["state"]
    # The parity check drove decoder.prefill, i.e. this graph, for every language's prompt.
    report = json.loads((cli_bundle / "parity.json").read_text())
    assert report["passed"] and report["tokens_identical"] and report["max_abs_diff"] <= ATOL
    assert all(r["prompt_tokens"] > 5 for r in report["languages"].values())
    assert "`prefill.onnx`" in (cli_bundle / "README.md").read_text()


def test_the_prefill_graph_is_refused_as_the_step_graph(cli_bundle):
    """`--graph prefill.onnx` said the graph's inputs do not match config.json: true, and no help."""
    from sokhan import SokhanError

    with pytest.raises(SokhanError, match=r"prefill.onnx: the prompt \(prefill\) graph, which runs with decoder.onnx"):
        Decoder(cli_bundle, provider="cpu", graph="prefill.onnx")


def test_generate_uses_the_prefill_graph_and_agrees_with_stepping(cli_bundle, tmp_path, monkeypatch):
    stepped_dir = tmp_path / "stepped"
    shutil.copytree(cli_bundle, stepped_dir)
    cfg = json.loads((stepped_dir / "config.json").read_text())
    (stepped_dir / "config.json").write_text(json.dumps(cfg | {"prefill": None}))
    fused, stepped = Decoder(cli_bundle, provider="cpu"), Decoder(stepped_dir, provider="cpu")
    assert fused.prefill_session is not None and stepped.prefill_session is None

    calls = []
    real = fused._prefill_graph
    monkeypatch.setattr(fused, "_prefill_graph", lambda ids, b: calls.append(len(ids)) or real(ids, b))
    prompt = "we saw the big house with the good book"
    assert fused.generate(prompt, 10, lang="en") == stepped.generate(prompt, 10, lang="en")
    assert calls == [len(fused.encode_prompt(prompt, "en"))]

    ids = stepped.encode_prompt("我 喜欢 学习 中文", "zh")
    (la, sa), (lb, sb) = stepped.prefill(ids, batch_size=2), fused.prefill(ids, batch_size=2)
    np.testing.assert_allclose(la, lb, atol=ATOL, rtol=0)
    assert sa.position == sb.position == len(ids) and sb.batch_size == 2
    for a, b in zip(sa.tensors, sb.tensors):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=ATOL, rtol=0)


def test_a_wrong_prefill_graph_fails_the_parity_check(monkeypatch):
    """Parity covers the prefill graph: one weight changed before tracing it (not the step) fails the stage."""
    from sokhan.export import prefill
    from sokhan.pipeline.stage import run_stage

    monkeypatch.setattr(prefill, "export_prefill", tampered(prefill.export_prefill))
    run = tiny_run("mamba")
    with pytest.raises(CheckFailed, match="parity failed"):
        run_stage("export", config("mamba", "export.prefill=true", "export.parity_steps=4"), run, force=True)
