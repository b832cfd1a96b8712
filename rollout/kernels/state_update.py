"""The decode step of a Mamba-2 layer: one token per sequence, state updated in place through a slot.

The engine keeps every sequence's SSM state in a preallocated ``[nslots, nheads, headdim, dstate]``
buffer; a decode batch names each row's slot, so sequences can finish and be replaced without moving
any state. A negative slot marks a padding row: it produces zeros and touches no state.
"""

from __future__ import annotations

import torch

from rollout.kernels.ssd_scan import _discretize_dt


def selective_state_update_ref(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                               B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, *,
                               slot_idx: torch.Tensor,
                               dt_limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """One recurrent step, PyTorch reference.

    state: [nslots, nheads, headdim, dstate] (fp32 by default), updated in place;
    x: [batch, nheads, headdim]; dt: [batch, nheads] (before bias and softplus); A, D, dt_bias: [nheads];
    B, C: [batch, ngroups, dstate]; slot_idx: [batch] int, the state slot of each row (< 0: padding).
    Returns y: [batch, nheads, headdim] in x's dtype (zeros on padding rows).
    """
    per_group = x.shape[1] // B.shape[1]
    valid = slot_idx >= 0
    dt = _discretize_dt(dt, dt_bias, dt_limit)                      # [batch, nheads]
    B = B.float().repeat_interleave(per_group, dim=1)               # [batch, nheads, dstate]
    C = C.float().repeat_interleave(per_group, dim=1)
    h = state[slot_idx.clamp(min=0)].float()
    h = h * torch.exp(dt * A.float())[..., None, None] + (dt[..., None] * x.float())[..., None] * B[:, :, None]
    state[slot_idx[valid]] = h[valid].to(state.dtype)
    y = torch.einsum("bhpn,bhn->bhp", h, C) + D.float()[:, None] * x.float()
    return (y * valid[:, None, None]).to(x.dtype)
