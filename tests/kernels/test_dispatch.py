"""The kernel dispatcher: precedence of per-call argument, ``use()`` and ``SOKHAN_KERNELS``, and the clear error when
the Triton backend cannot run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sokhan import SokhanError
from sokhan.kernels import dispatch


def test_auto_on_cpu_picks_the_fast_path_or_the_reference(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x = torch.zeros(2)
    assert dispatch.resolve("selective_scan", x, has_fast_path=True) == "cpu"
    assert dispatch.resolve("rms_norm", x) == "reference"
    assert dispatch.resolve("rms_norm", x, backend="cpu") == "reference"


def test_argument_beats_use_beats_environment(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.resolve("selective_scan", x, has_fast_path=True) == "reference"
    with dispatch.use("cpu"):
        assert dispatch.resolve("selective_scan", x, has_fast_path=True) == "cpu"
        assert dispatch.resolve("selective_scan", x, backend="reference", has_fast_path=True) == "reference"
        with dispatch.use("reference"):
            assert dispatch.requested() == "reference"
        assert dispatch.requested() == "cpu"
        # "auto" and None are no preference: the enclosing choice stands.
        assert dispatch.requested("auto") == "cpu"
    assert dispatch.requested() == "reference"


def test_unknown_backend_names_the_valid_ones(monkeypatch):
    with pytest.raises(SokhanError, match="unknown kernel backend 'cuda'.*auto, triton, reference, cpu"):
        dispatch.requested("cuda")
    with pytest.raises(SokhanError, match="dispatch.use"):
        with dispatch.use("fast"):
            pass
    monkeypatch.setenv(dispatch.ENV_VAR, "gpu")
    with pytest.raises(SokhanError, match="SOKHAN_KERNELS"):
        dispatch.requested()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_triton_without_cuda_or_interpreter_is_one_clear_error(how):
    """In a fresh process without TRITON_INTERPRET, forcing Triton on CPU tensors fails loudly, never computes."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available, so the Triton backend can run here")
    forced = ", backend='triton'" if how == "argument" else ""
    code = (
        "import torch\n"
        "from sokhan import SokhanError\n"
        "from sokhan.kernels import selective_scan\n"
        "u = torch.randn(1, 2, 3); B = torch.randn(1, 4, 3)\n"
        "try:\n"
        f"    selective_scan(u, u, -torch.ones(2, 4), B, B{forced})\n"
        "except SokhanError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    print('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if how == "environment":
        env[dispatch.ENV_VAR] = "triton"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "needs CUDA tensors" in lines[0] and "backend='reference'" in lines[0]
