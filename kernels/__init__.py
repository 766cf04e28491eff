"""Fused ops for the Mamba and transformer models, each beside a plain-PyTorch reference with the same signature.

Every public op takes ``backend=None|"auto"|"triton"|"reference"|"cpu"``; :mod:`sokhan.kernels.dispatch` says how
the backend is chosen (per call, ``with dispatch.use(...)``, or ``SOKHAN_KERNELS``).
"""

from sokhan.kernels import dispatch
from sokhan.kernels.causal_conv1d import causal_conv1d, causal_conv1d_update
from sokhan.kernels.cross_entropy import cross_entropy
from sokhan.kernels.flash_attention import flash_attention
from sokhan.kernels.linear_cross_entropy import linear_cross_entropy
from sokhan.kernels.rms_norm import rms_norm
from sokhan.kernels.selective_scan import selective_scan
from sokhan.kernels.selective_state_update import selective_state_update

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "cross_entropy",
    "dispatch",
    "flash_attention",
    "linear_cross_entropy",
    "rms_norm",
    "selective_scan",
    "selective_state_update",
]
