"""Causal depthwise conv1d of a Mamba-2 layer: prefill over packed prompts and the one-token update.

Prefill returns, per sequence, the last ``width - 1`` inputs: that is the whole conv state a sequence
needs for decoding, kept in a preallocated ``[nslots, dim, width - 1]`` buffer and addressed by slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rollout.kernels.ssd_scan import _segments


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                      cu_seqlens: torch.Tensor | None = None,
                      silu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over each sequence from a zero state, PyTorch reference.

    x: [batch, seqlen, dim]; weight: [dim, width]; bias: [dim] or None; cu_seqlens: [nseq + 1] offsets
    of packed sequences in row 0 (batch 1), or None (nseq = batch). Returns out: [batch, seqlen, dim]
    (SiLU applied when ``silu``) and conv_states: [nseq, dim, width - 1], each sequence's last inputs
    (zero-padded on the left when it is shorter than width - 1).
    """
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    out = torch.empty_like(x)
    states = []
    for row, start, end in _segments(batch, seqlen, cu_seqlens):
        seq = F.pad(x[row, start:end].T, (width - 1, 0))            # [dim, width - 1 + T]
        y = F.conv1d(seq[None].to(weight.dtype), weight[:, None], bias, groups=dim)[0]
        out[row, start:end] = (F.silu(y) if silu else y).T.to(x.dtype)
        states.append(seq[:, seq.shape[1] - (width - 1):])
    return out, torch.stack(states)


def causal_conv1d_update_ref(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, *, slot_idx: torch.Tensor,
                             silu: bool = True) -> torch.Tensor:
    """One token per sequence through the conv, shifting its slot's state in place; PyTorch reference.

    x: [batch, dim]; conv_state: [nslots, dim, width - 1], updated in place; weight: [dim, width];
    bias: [dim] or None; slot_idx: [batch] int (< 0: padding row, zeros out, no state change).
    Returns out: [batch, dim] in x's dtype.
    """
    valid = slot_idx >= 0
    window = torch.cat([conv_state[slot_idx.clamp(min=0)], x[..., None].to(conv_state.dtype)], dim=-1)
    conv_state[slot_idx[valid]] = window[valid, :, 1:]
    y = (window.to(weight.dtype) * weight).sum(-1)
    if bias is not None:
        y = y + bias
    y = F.silu(y) if silu else y
    return (y * valid[:, None]).to(x.dtype)
