"""Kernels of the rollout engine: Triton on GPU, the PyTorch reference of the same math on CPU.

Every op has three names with one signature:

- ``<op>`` (``ssd_scan``, ``selective_state_update``, ``causal_conv1d``, ``causal_conv1d_update``,
  ``rms_norm``, ``gated_rms_norm``, ``decode_attention``): what the engine calls; it runs ``<op>_triton``
  when the first tensor argument is on CUDA and ``<op>_ref`` otherwise.
- ``<op>_triton``: the Triton kernels (CPU tensors too, under ``TRITON_INTERPRET=1``, which the tests use).
- ``<op>_ref``: the PyTorch reference, the executable spec the kernels are tested against.

Triton is a declared dependency (it ships with every CUDA build of torch), so the device alone decides.

On CPU, ``decode_attention`` has a C++ kernel (``decode_attention_cpp``, in ``rollout.kernels.cpu``,
compiled by ``build_cpu_kernels``), taken where it fits the tensors (float32), the reference otherwise.
``mamba_step_cpp`` and ``mamba_prefill_cpp`` fuse what a Mamba layer does between its two projections
(conv, recurrence, gated norm) into one CPU kernel for a decode step and one for a prefill, where
``fits_mamba_step``; elsewhere the engine calls the three ops in turn (``mamba_step_ref`` and
``mamba_prefill_ref`` are those sequences of references).

Note that ``rollout.kernels.ssd_scan`` names the dispatcher, which shadows the submodule of the same name:
reach the submodule's own names with ``from rollout.kernels.ssd_scan import ...``.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from rollout.kernels.attention import decode_attention as decode_attention_triton
from rollout.kernels.attention import decode_attention_ref
from rollout.kernels.conv1d import causal_conv1d as causal_conv1d_triton
from rollout.kernels.conv1d import causal_conv1d_ref, causal_conv1d_update_ref
from rollout.kernels.conv1d import causal_conv1d_update as causal_conv1d_update_triton
from rollout.kernels.cpu import build as build_cpu_kernels
from rollout.kernels.cpu import (decode_attention_cpp, fits_attention, fits_mamba_step, mamba_prefill_cpp,
                                 mamba_prefill_ref, mamba_step_cpp, mamba_step_ref)
from rollout.kernels.rms_norm import gated_rms_norm as gated_rms_norm_triton
from rollout.kernels.rms_norm import gated_rms_norm_ref, rms_norm_ref
from rollout.kernels.rms_norm import rms_norm as rms_norm_triton
from rollout.kernels.ssd_scan import ssd_scan as ssd_scan_triton
from rollout.kernels.ssd_scan import ssd_scan_ref
from rollout.kernels.state_update import selective_state_update as selective_state_update_triton
from rollout.kernels.state_update import selective_state_update_ref

Op = TypeVar("Op", bound=Callable[..., Any])


def _dispatch(ref: Op, triton_op: Op | None = None, cpp: Op | None = None,
              fits: Callable[[Any, Any], bool] | None = None) -> Op:
    """The public op: ``cpp`` where ``fits`` takes its first two arguments (the C++ kernel is built and
    the tensors are of its kind), else ``triton_op`` for CUDA tensors, else ``ref``."""
    def op(*args: Any, **kwargs: Any) -> Any:
        if cpp is not None and fits(*args[:2]):
            return cpp(*args, **kwargs)
        return (triton_op if triton_op is not None and args[0].is_cuda else ref)(*args, **kwargs)

    op.__name__ = op.__qualname__ = ref.__name__.removesuffix("_ref")
    op.__module__ = __name__
    paths = ([f"``{op.__name__}_cpp`` where it fits the tensors"] if cpp is not None else []) + (
        [f"``{op.__name__}_triton`` on CUDA tensors"] if triton_op is not None else [])
    op.__doc__ = f"{', '.join(paths)}, ``{ref.__name__}`` otherwise.\n\n{ref.__doc__}"
    return op  # type: ignore[return-value]


ssd_scan = _dispatch(ssd_scan_ref, ssd_scan_triton)
selective_state_update = _dispatch(selective_state_update_ref, selective_state_update_triton)
causal_conv1d = _dispatch(causal_conv1d_ref, causal_conv1d_triton)
causal_conv1d_update = _dispatch(causal_conv1d_update_ref, causal_conv1d_update_triton)
rms_norm = _dispatch(rms_norm_ref, rms_norm_triton)
gated_rms_norm = _dispatch(gated_rms_norm_ref, gated_rms_norm_triton)
decode_attention = _dispatch(decode_attention_ref, decode_attention_triton, decode_attention_cpp, fits_attention)


__all__ = [
    "build_cpu_kernels", "decode_attention", "decode_attention_cpp", "decode_attention_ref", "decode_attention_triton",
    "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_triton",
    "causal_conv1d_update", "causal_conv1d_update_ref", "causal_conv1d_update_triton",
    "fits_mamba_step", "gated_rms_norm", "gated_rms_norm_ref", "gated_rms_norm_triton",
    "mamba_prefill_cpp", "mamba_prefill_ref", "mamba_step_cpp", "mamba_step_ref",
    "rms_norm", "rms_norm_ref", "rms_norm_triton",
    "selective_state_update", "selective_state_update_ref", "selective_state_update_triton",
    "ssd_scan", "ssd_scan_ref", "ssd_scan_triton",
]
