"""Scan kernels of the rollout engine: Triton on GPU, the PyTorch reference of the same math on CPU."""

from __future__ import annotations

from rollout.kernels.conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from rollout.kernels.ssd_scan import ssd_scan_ref
from rollout.kernels.state_update import selective_state_update_ref

__all__ = ["causal_conv1d_ref", "causal_conv1d_update_ref", "selective_state_update_ref", "ssd_scan_ref"]
