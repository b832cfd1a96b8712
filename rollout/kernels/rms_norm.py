"""The two RMS norms of a NemotronH model, each one kernel: the block norm before every mixer and the gated,
grouped norm inside every Mamba layer.

transformers writes each as about seven PyTorch calls (casts, square, mean, rsqrt, products). A decode step
runs one norm per layer plus one per Mamba layer, 84 in Nemotron-Nano-9B-v2, on a few hundred kilobytes each,
so the calls' fixed cost, not their bytes, is what they take, and one kernel per norm removes most of it.

Both kernels round where transformers' modules do (``NemotronHRMSNorm``: the weight multiply in fp32, then
one rounding to x's dtype; ``NemotronHRMSNormGated``: the normalized values rounded to x's dtype, then
multiplied by the weight in the weight's dtype), so they differ from the modules only where a sum taken in
another order moves the last bit; the tests hold them to that. The references are the modules' own steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    # Pointers
    x_ptr, gate_ptr, weight_ptr, out_ptr,
    # Dimensions
    group_size, eps,
    # Strides
    stride_x, stride_gate, stride_out,
    # Meta-parameters
    GATED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One group of channels of one row (the whole row when the norm is not grouped), in fp32."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * group_size + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < group_size
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        gate = tl.load(gate_ptr + row * stride_gate + offs, mask=mask, other=0.0).to(tl.float32)
        h = h * (gate * tl.sigmoid(gate))
    h = h * tl.rsqrt(tl.sum(h * h, axis=0) / group_size + eps)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:   # rounded to x's dtype before the weight multiply
        h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (weight * h).to(out_ptr.dtype.element_ty), mask=mask)


def _rms_norm_fwd(x: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, eps: float, group_size: int,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """Launches one program per (row, group) over x viewed as [rows, width]."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    gates = rows if gate is None else gate.reshape(-1, width)   # x: a placeholder pointer when not gated
    gates = gates if gates.stride(-1) == 1 else gates.contiguous()
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    block = triton.next_power_of_2(group_size)
    _rms_norm_kernel[(rows.shape[0], width // group_size)](
        rows, gates, weight, out,
        group_size, eps,
        rows.stride(0), gates.stride(0), out.stride(0),
        GATED=gate is not None, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    """``NemotronHRMSNorm``, Triton.

    x: [..., width]; weight: [width]. Returns [..., width] in x's dtype: x * rsqrt(mean(x²) + eps) * weight,
    computed in fp32 and rounded once.
    """
    return _rms_norm_fwd(x, None, weight.contiguous(), eps, x.shape[-1], x.dtype)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, *, eps: float,
                   group_size: int) -> torch.Tensor:
    """``NemotronHRMSNormGated``, Triton.

    x, gate: [..., width]; weight: [width]; group_size divides width. Returns [..., width] in the promoted
    dtype of x and weight: h = x * silu(gate) in fp32, normalized by the RMS of each group of ``group_size``
    channels, rounded to x's dtype, times weight.
    """
    if x.shape[-1] % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the width ({x.shape[-1]})")
    return _rms_norm_fwd(x, gate, weight.contiguous(), eps, group_size, torch.promote_types(x.dtype, weight.dtype))


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    """``NemotronHRMSNorm``, PyTorch reference.

    x: [..., width]; weight: [width]. Returns [..., width] in x's dtype: x * rsqrt(mean(x²) + eps) * weight,
    computed in fp32 and rounded once.
    """
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(x.dtype)


def gated_rms_norm_ref(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, *, eps: float,
                       group_size: int) -> torch.Tensor:
    """``NemotronHRMSNormGated``, PyTorch reference.

    x, gate: [..., width]; weight: [width]; group_size divides width. Returns [..., width] in the promoted
    dtype of x and weight: h = x * silu(gate) in fp32, normalized by the RMS of each group of ``group_size``
    channels, rounded to x's dtype, times weight.
    """
    h = (x.float() * F.silu(gate.float())).unflatten(-1, (-1, group_size))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.flatten(-2).to(x.dtype)
