"""Kernels of the rollout engine: Triton on GPU, the PyTorch reference of the same math on CPU.

Every op has three names with one signature:

- ``<op>`` (``ssd_scan``, ``selective_state_update``, ``causal_conv1d``, ``causal_conv1d_update``,
  ``rms_norm``, ``gated_rms_norm``): what the engine calls; it runs ``<op>_triton`` when the first tensor
  argument is on CUDA and ``<op>_ref`` otherwise.
- ``<op>_triton``: the Triton kernels (CPU tensors too, under ``TRITON_INTERPRET=1``, which the tests use).
- ``<op>_ref``: the PyTorch reference, the executable spec the kernels are tested against.

Triton is a declared dependency (it ships with every CUDA build of torch), so the device alone decides.

On CPU, ``decode_attention`` and ``selective_state_update`` have a C++ kernel (``<op>_cpp``, in
``rollout.kernels.cpu``, compiled by ``build_cpu_kernels``), taken where it fits the tensors (float32), the
reference otherwise. ``decode_attention`` has no Triton kernel: on a GPU its reference's batched products
are what the engine runs.

Note that ``rollout.kernels.ssd_scan`` names the dispatcher, which shadows the submodule of the same name:
reach the submodule's own names with ``from rollout.kernels.ssd_scan import ...``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

from rollout.kernels.conv1d import causal_conv1d as causal_conv1d_triton
from rollout.kernels.conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from rollout.kernels.conv1d import causal_conv1d_update as causal_conv1d_update_triton
from rollout.kernels.cpu import build as build_cpu_kernels
from rollout.kernels.cpu import (decode_attention_cpp, decode_attention_ref, fits_attention, fits_state_update,
                                 selective_state_update_cpp)
from rollout.kernels.rms_norm import gated_rms_norm as gated_rms_norm_triton
from rollout.kernels.rms_norm import gated_rms_norm_ref, rms_norm_ref
from rollout.kernels.rms_norm import rms_norm as rms_norm_triton
from rollout.kernels.ssd_scan import ssd_scan as ssd_scan_triton
from rollout.kernels.ssd_scan import ssd_scan_ref
from rollout.kernels.state_update import selective_state_update as selective_state_update_triton
from rollout.kernels.state_update import selective_state_update_ref

Op = TypeVar("Op", bound=Callable[..., Any])


def _by_device(triton_op: Op, ref: Op) -> Op:
    """``triton_op`` for CUDA tensors, ``ref`` otherwise, chosen by the first argument's device."""
    @functools.wraps(triton_op)
    def op(*args: Any, **kwargs: Any) -> Any:
        return (triton_op if args[0].is_cuda else ref)(*args, **kwargs)

    op.__module__ = __name__
    op.__doc__ = f"``{op.__name__}_triton`` on CUDA tensors, ``{ref.__name__}`` otherwise.\n\n{ref.__doc__}"
    return op  # type: ignore[return-value]


ssd_scan = _by_device(ssd_scan_triton, ssd_scan_ref)
_selective_state_update = _by_device(selective_state_update_triton, selective_state_update_ref)
causal_conv1d = _by_device(causal_conv1d_triton, causal_conv1d_ref)
causal_conv1d_update = _by_device(causal_conv1d_update_triton, causal_conv1d_update_ref)
rms_norm = _by_device(rms_norm_triton, rms_norm_ref)
gated_rms_norm = _by_device(gated_rms_norm_triton, gated_rms_norm_ref)


def selective_state_update(state: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """``selective_state_update_cpp`` where it fits the tensors (built, float32 on CPU), else
    ``selective_state_update_triton`` on CUDA tensors and ``selective_state_update_ref`` otherwise."""
    op = selective_state_update_cpp if fits_state_update(state, x) else _selective_state_update
    return op(state, x, *args, **kwargs)


def decode_attention(q: Any, keys: Any, values: Any, bias: Any, scale: float) -> Any:
    """``decode_attention_cpp`` where it fits the tensors (built, float32 on CPU, keys with contiguous
    positions), ``decode_attention_ref`` otherwise."""
    return (decode_attention_cpp if fits_attention(q, keys) else decode_attention_ref)(q, keys, values, bias, scale)


__all__ = [
    "build_cpu_kernels", "decode_attention", "decode_attention_cpp", "decode_attention_ref",
    "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_triton",
    "causal_conv1d_update", "causal_conv1d_update_ref", "causal_conv1d_update_triton",
    "gated_rms_norm", "gated_rms_norm_ref", "gated_rms_norm_triton", "rms_norm", "rms_norm_ref", "rms_norm_triton",
    "selective_state_update", "selective_state_update_cpp", "selective_state_update_ref",
    "selective_state_update_triton",
    "ssd_scan", "ssd_scan_ref", "ssd_scan_triton",
]
