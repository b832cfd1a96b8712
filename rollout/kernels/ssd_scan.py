"""Chunked SSD scan (Mamba-2 "state space duality") for prefill.

For each head the recurrence is ``h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t ⊗ B_t`` and
``y_t = C_t · h_t + D * x_t``. The chunked form computes it as a masked quadratic form inside each chunk
of ``chunk_size`` tokens plus one state hand-off per chunk, which is what makes prefill fast. Several
prompts can be packed into one row with ``cu_seqlens``: each starts from its own initial state (zero by
default), none sees another's tokens, and each gets its own final state back for decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    """softplus(dt + dt_bias) clamped to dt_limit, in fp32."""
    return F.softplus(dt.float() + dt_bias.float()).clamp(dt_limit[0], dt_limit[1])


def _segments(batch: int, seqlen: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sequence: one per row, or the packed sequences of row 0."""
    if cu_seqlens is None:
        return [(b, 0, seqlen) for b in range(batch)]
    if batch != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch 1, got {batch}")
    bounds = cu_seqlens.tolist()
    return [(0, start, end) for start, end in zip(bounds[:-1], bounds[1:])]


def _scan_one(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              state: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence in fp32: x [T, H, P], dt [T, H], B and C [T, H, N], state [H, P, N]."""
    a = dt * A                                  # log-decay of each step, <= 0
    xdt = x * dt[..., None]
    ys = []
    for start in range(0, x.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        cum = a[chunk].cumsum(0)                # [q, H]
        # exp(cum_t - cum_s) for s <= t; the exponent is clamped at 0 so rounding cannot overflow it.
        gap = (cum[:, None, :] - cum[None, :, :]).clamp(max=0.0)
        causal = torch.ones(gap.shape[:2], dtype=torch.bool, device=x.device).tril()[..., None]
        decay = torch.exp(gap.masked_fill(~causal, float("-inf")))          # [q(t), q(s), H]
        scores = torch.einsum("thn,shn->tsh", C[chunk], B[chunk]) * decay
        y = torch.einsum("tsh,shp->thp", scores, xdt[chunk])
        y = y + torch.exp(cum)[..., None] * torch.einsum("thn,hpn->thp", C[chunk], state)
        to_end = torch.exp((cum[-1:] - cum).clamp(max=0.0))                 # [q, H]
        state = torch.exp(cum[-1])[:, None, None] * state + torch.einsum(
            "sh,shp,shn->hpn", to_end, xdt[chunk], B[chunk])
        ys.append(y)
    return torch.cat(ys), state


def ssd_scan_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor, dt_bias: torch.Tensor, *, chunk_size: int,
                 dt_limit: tuple[float, float] = (0.0, float("inf")),
                 initial_states: torch.Tensor | None = None,
                 cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan, PyTorch reference.

    x: [batch, seqlen, nheads, headdim]; dt: [batch, seqlen, nheads] (before bias and softplus);
    A: [nheads] (negative); B, C: [batch, seqlen, ngroups, dstate] (nheads a multiple of ngroups);
    D, dt_bias: [nheads]; initial_states: [nseq, nheads, headdim, dstate] or None (zeros);
    cu_seqlens: [nseq + 1] int offsets of packed sequences in row 0 (then batch is 1), or None
    (then nseq = batch). Returns y: [batch, seqlen, nheads, headdim] in x's dtype and
    final_states: [nseq, nheads, headdim, dstate] in fp32. The state is carried in fp32 throughout.
    """
    batch, seqlen, nheads, headdim = x.shape
    per_group = nheads // B.shape[2]
    dt = _discretize_dt(dt, dt_bias, dt_limit)
    B = B.float().repeat_interleave(per_group, dim=2)
    C = C.float().repeat_interleave(per_group, dim=2)
    segments = _segments(batch, seqlen, cu_seqlens)
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    finals = []
    for i, (row, start, end) in enumerate(segments):
        state = (initial_states[i].float() if initial_states is not None
                 else x.new_zeros(nheads, headdim, B.shape[-1], dtype=torch.float32))
        span = slice(start, end)
        y[row, span], state = _scan_one(x[row, span].float(), dt[row, span], A.float(), B[row, span],
                                        C[row, span], state, chunk_size)
        finals.append(state)
    y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype), torch.stack(finals)
