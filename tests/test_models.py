"""Both architectures: every preset builds, parameter names and counts, initialisation, gradients reach every weight."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from sokhan import SokhanError
from sokhan.kernels import dispatch
from sokhan.pipeline.models import PRESETS, MambaLM, ModelConfig, Transformer, build
from sokhan.pipeline.models.layers import swiglu_hidden

VOCAB = 8000


def expected_params(cfg: ModelConfig) -> int:
    """Parameters counted by hand from the architecture (the tied lm_head counted once)."""
    d, n_layers, v = cfg.d_model, cfg.n_layers, cfg.vocab_size
    head = 0 if cfg.tie_embeddings else v * d
    if cfg.arch == "transformer":
        mlp = 3 * d * swiglu_hidden(d) if cfg.mlp == "swiglu" else 2 * d * 4 * d
        return v * d + head + d + n_layers * (4 * d * d + mlp + 2 * d)
    di, n, r, w = cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
    if cfg.selective:
        ssm = di * (r + 2 * n) + r * di + di  # x_proj, dt_proj weight and bias
    else:
        ssm = di + 2 * di * n  # dt_bias, B and C per channel
    mixer = d * 2 * di + di * w + di + ssm + di * n + di + di * d  # in_proj, conv1d, ..., A_log, D, out_proj
    return v * d + head + d + n_layers * (mixer + d)


PRESET_CASES = [
    pytest.param(arch, preset, selective, id=f"{arch}-{preset}" + ("" if selective else "-lti"))
    for arch in PRESETS
    for preset in PRESETS[arch]
    for selective in ([True, False] if arch == "mamba" else [True])
]


@pytest.mark.parametrize("arch,preset,selective", PRESET_CASES)
def test_every_preset_builds_with_the_expected_parameter_count(arch, preset, selective):
    cfg = ModelConfig(arch=arch, preset=preset, selective=selective).resolve(VOCAB)
    # Sizes only: the meta device allocates nothing, so even `base` costs nothing to build.
    with torch.device("meta"):
        model = build(cfg)
    assert isinstance(model, Transformer if arch == "transformer" else MambaLM)
    assert sum(p.numel() for p in model.parameters()) == expected_params(cfg)
    assert model.get_input_embeddings().weight.shape == (VOCAB, cfg.d_model)


@pytest.mark.parametrize("arch", ["transformer", "mamba"])
def test_tiny_preset_runs_forward_and_step(arch):
    torch.manual_seed(0)
    model = build(ModelConfig(arch=arch, preset="tiny").resolve(VOCAB)).eval()
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        assert model(ids).shape == (2, 5, VOCAB)
        logits, _ = model.step(ids[:, 0], model.init_state(2))
    assert logits.shape == (2, VOCAB) and torch.isfinite(logits).all()


def test_untied_head_is_a_separate_matrix():
    cfg = ModelConfig(arch="mamba", d_model=16, n_layers=1, tie_embeddings=False).resolve(50)
    model = build(cfg)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) == expected_params(cfg)


def test_mamba_parameter_names_follow_hf():
    model = build(ModelConfig(arch="mamba", d_model=32, n_layers=2).resolve(50))
    mixer = ["A_log", "D", "conv1d.weight", "conv1d.bias", "in_proj.weight", "x_proj.weight", "dt_proj.weight",
             "dt_proj.bias", "out_proj.weight"]  # fmt: skip
    expected = {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"backbone.layers.{i}.mixer.{name}" for name in mixer} | {f"backbone.layers.{i}.norm.weight"}
    state = model.state_dict()
    assert set(state) == expected
    assert state["backbone.layers.0.mixer.conv1d.weight"].shape == (64, 1, 4)  # HF's (D_inner, 1, d_conv)
    assert state["backbone.layers.0.mixer.x_proj.weight"].shape == (2 + 2 * 16, 64)  # dt_rank = ceil(32 / 16)
    assert state["lm_head.weight"].data_ptr() == state["backbone.embeddings.weight"].data_ptr()


def test_lti_mamba_has_no_input_dependent_projection():
    model = build(ModelConfig(arch="mamba", d_model=32, n_layers=1, selective=False).resolve(50))
    names = {n.removeprefix("backbone.layers.0.mixer.") for n in model.state_dict()}
    assert {"dt_bias", "B", "C", "A_log", "D"} <= names
    assert not any(n.startswith(("x_proj", "dt_proj")) for n in names)


def test_lti_convolution_equals_the_scan_with_gradients():
    """The LTI ablation trains through an FFT convolution; from a zero state it must be the scan it stands for,
    outputs and every parameter's gradient (float64, fresh random parameters, per-channel B and C)."""
    torch.manual_seed(5)
    model = build(ModelConfig(arch="mamba", d_model=16, n_layers=1, selective=False).resolve(50)).double()
    mixer = model.backbone.layers[0].mixer
    assert mixer.B.shape == mixer.C.shape == (32, 16)  # one B and C per channel, as S4D
    with torch.no_grad():
        for p in (mixer.B, mixer.C, mixer.dt_bias, mixer.A_log):
            p.add_(torch.randn_like(p) * 0.5)
    hidden = torch.randn(3, 37, 16, dtype=torch.float64)
    results = []
    for state in (False, True):  # True: the path with a state to fill, which runs the selective_scan kernel
        mixer.zero_grad()
        kwargs = dict(conv_state=torch.zeros(3, 32, 4, dtype=torch.float64),
                      ssm_state=torch.zeros(3, 32, 16, dtype=torch.float64)) if state else {}
        out = mixer(hidden, **kwargs)
        out.pow(2).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in mixer.named_parameters()}))
    (conv, conv_grads), (scan, scan_grads) = results
    assert torch.allclose(conv, scan, rtol=1e-10, atol=1e-12)
    for name in scan_grads:
        assert torch.allclose(conv_grads[name], scan_grads[name], rtol=1e-9, atol=1e-11), name


def test_transformer_parameter_names():
    model = build(ModelConfig(arch="transformer", d_model=32, n_layers=1, n_heads=4).resolve(50))
    assert set(model.state_dict()) == {
        "embeddings.weight", "norm_f.weight", "lm_head.weight", "layers.0.norm_1.weight", "layers.0.norm_2.weight",
        "layers.0.attn.c_attn.weight", "layers.0.attn.c_proj.weight",
        "layers.0.mlp.gate.weight", "layers.0.mlp.up.weight", "layers.0.mlp.down.weight",
    }  # fmt: skip


def test_transformer_init():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="transformer", d_model=256, n_layers=8, n_heads=4).resolve(2000)
    model = build(cfg)
    std = {n: p.std().item() for n, p in model.named_parameters()}
    assert std["embeddings.weight"] == pytest.approx(0.02, rel=0.05)
    assert std["layers.3.attn.c_attn.weight"] == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert std["layers.3.attn.c_proj.weight"] == pytest.approx(residual, rel=0.05)
    assert std["layers.3.mlp.down.weight"] == pytest.approx(residual, rel=0.05)
    assert torch.equal(model.norm_f.weight, torch.ones(256))
    assert model.lm_head.weight is model.embeddings.weight


def test_mamba_init():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="mamba", d_model=64, n_layers=4, dt_min=0.002, dt_max=0.05).resolve(500)
    model = build(cfg)
    mixer = model.backbone.layers[1].mixer
    # S4D-real: A = -(1..N) in every channel.
    assert torch.allclose(-torch.exp(mixer.A_log), -torch.arange(1.0, 17.0).expand(cfg.d_inner, -1))
    assert torch.equal(mixer.D.detach(), torch.ones(cfg.d_inner))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    # log-uniform: log dt spreads over the whole range, its mean near the middle.
    assert torch.log(dt).mean().item() == pytest.approx((math.log(0.002) + math.log(0.05)) / 2, abs=0.3)
    assert mixer.dt_proj.weight.abs().max() <= cfg.dt_rank**-0.5
    assert model.backbone.embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # out_proj: nn.Linear's default bound 1/sqrt(fan_in), divided by sqrt(n_layers).
    bound = 1 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layers)
    assert mixer.out_proj.weight.abs().max() <= bound
    assert mixer.out_proj.weight.abs().max() > 0.9 * bound


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(dict(arch="transformer", n_heads=2), id="transformer"),
        pytest.param(dict(arch="transformer", n_heads=2, mlp="gelu", tie_embeddings=False), id="transformer-gelu"),
        pytest.param(dict(arch="mamba"), id="mamba"),
        pytest.param(dict(arch="mamba", selective=False), id="mamba-lti"),
    ],
)
def test_loss_gradient_reaches_every_parameter(cfg):
    torch.manual_seed(0)
    model = build(ModelConfig(d_model=16, n_layers=2, **cfg).resolve(40))
    ids = torch.randint(0, 40, (2, 7))
    with dispatch.use("reference"):
        logits = model(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, 40), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["mamba", "transformer"])
def test_dropout_acts_in_training_only(arch):
    """dropout adds no weights; in eval mode the model is the dropout-free one, in training it perturbs the logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, d_model=32, n_layers=2, n_heads=2, dropout=0.3).resolve(64)
    model = build(cfg)
    plain = build(ModelConfig(arch=arch, d_model=32, n_layers=2, n_heads=2).resolve(64))
    plain.load_state_dict(model.state_dict())  # strict: the same parameter names and shapes
    ids = torch.randint(0, 64, (2, 12))
    with dispatch.use("reference"), torch.no_grad():
        assert torch.equal(model.eval()(ids), plain.eval()(ids))
        model.train()
        assert not torch.allclose(model(ids), model(ids))


def test_causality_later_tokens_do_not_change_earlier_logits():
    for arch in ("transformer", "mamba"):
        torch.manual_seed(0)
        model = build(ModelConfig(arch=arch, d_model=16, n_layers=2, n_heads=2).resolve(40)).eval()
        ids = torch.randint(0, 40, (2, 9))
        changed = ids.clone()
        changed[:, 5:] = (changed[:, 5:] + 1) % 40
        with torch.no_grad(), dispatch.use("reference"):
            a, b = model(ids), model(changed)
        assert torch.equal(a[:, :5], b[:, :5]), arch
        assert not torch.allclose(a[:, 5:], b[:, 5:]), arch


def test_resolve_rejects_heads_that_rotary_embeddings_cannot_rotate():
    with pytest.raises(SokhanError, match="n_heads = 8"):
        ModelConfig(arch="transformer", d_model=24, n_heads=8).resolve(50)  # head size 3


def test_build_needs_a_resolved_config():
    with pytest.raises(ValueError, match="resolve"):
        build(ModelConfig(arch="mamba"))


def test_importing_models_package_does_not_import_torch():
    code = "import sys, sokhan.pipeline.models as m; m.ModelConfig; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
