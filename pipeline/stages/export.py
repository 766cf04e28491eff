"""export stage: the one-token decode step as ONNX, in a bundle, checked against PyTorch."""

from __future__ import annotations

from dataclasses import dataclass

SECTIONS = ("export",)
UPSTREAM = ("tokenize", "train")


@dataclass
class ExportConfig:
    """What is exported and how parity is checked."""

    opset: int = 18
    prefill: bool = False
    parity_steps: int = 64
    parity_atol: float = 1e-4


def run(ctx) -> dict:
    raise NotImplementedError("export stage: being written this session")
