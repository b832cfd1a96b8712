"""Scan kernels of the rollout engine: Triton on GPU, the PyTorch reference of the same math on CPU.

The engine calls the names without suffix (``ssd_scan``, ``selective_state_update``, ``causal_conv1d``,
``causal_conv1d_update``); each picks the Triton op for CUDA tensors and the ``*_ref`` otherwise.
"""

from __future__ import annotations

from rollout.kernels.conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from rollout.kernels.ssd_scan import ssd_scan_ref
from rollout.kernels.state_update import selective_state_update_ref

# Until the Triton ops land, every name dispatches to its reference.
ssd_scan = ssd_scan_ref
selective_state_update = selective_state_update_ref
causal_conv1d = causal_conv1d_ref
causal_conv1d_update = causal_conv1d_update_ref
