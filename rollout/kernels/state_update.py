"""The decode step of a Mamba-2 layer: one token per sequence, state updated in place through a slot.

The engine keeps every sequence's SSM state in a preallocated ``[nslots, nheads, headdim, dstate]``
buffer. A decode batch either names each row's slot (a negative slot marks a padding row: it produces
zeros and touches no state) or names none: then row i is slot i, which is how the engine runs, its
running sequences always in the first slots.

The step reads and writes the whole state once and does ~5 FLOPs per element, so it is bound by memory
bandwidth: one program per (headdim block, row, head) as in mamba_ssm, the state updated in fp32 registers
and stored back in its own dtype. Block sizes are set by hand, not autotuned, since autotuning would rerun
a kernel that updates the state in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rollout.kernels.ssd_scan import _discretize_dt, _discretize_dt_tl, _inner_contiguous


@triton.jit
def _state_update_kernel(
    # Pointers
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, dt_bias_ptr, slot_ptr, y_ptr,
    # Dimensions
    headdim, dstate, heads_per_group, dt_min, dt_max,
    # Strides
    stride_s_slot, stride_s_h, stride_s_p, stride_x_b, stride_x_h, stride_dt_b, stride_dt_h,
    stride_B_b, stride_B_g, stride_C_b, stride_C_g, stride_y_b, stride_y_h,
    # Meta-parameters
    HAS_SLOTS: tl.constexpr, PDL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One step for a block of headdim rows of one head of one batch row. Under a programmatic dependent
    launch (``PDL``), it reads what the kernel before it may write only after ``gdc_wait``; without a slot
    index its state block is read before that, overlapping the kernel before it."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    y_ptrs = y_ptr + pid_b * stride_y_b + pid_h * stride_y_h + offs_p
    if HAS_SLOTS:
        if PDL:     # the slot index may come from the kernel before
            tl.extra.cuda.gdc_wait()
        slot = tl.load(slot_ptr + pid_b).to(tl.int64)
    else:           # no slot index: row i is slot i
        slot = pid_b
    if slot < 0:    # a padding row: zeros out, no state read or written
        tl.store(y_ptrs, tl.zeros((BLOCK_P,), dtype=y_ptr.dtype.element_ty), mask=mask_p)
        return

    group = pid_h // heads_per_group
    state_ptrs = (state_ptr + slot * stride_s_slot + pid_h * stride_s_h + offs_p[:, None] * stride_s_p
                  + offs_n[None, :])
    mask = mask_p[:, None] & mask_n[None, :]
    h = tl.load(state_ptrs, mask=mask, other=0.0).to(tl.float32)
    if PDL and not HAS_SLOTS:   # the state is in flight; the inputs are the kernel before's outputs
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + pid_b * stride_x_b + pid_h * stride_x_h + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    dt = _discretize_dt_tl(tl.load(dt_ptr + pid_b * stride_dt_b + pid_h * stride_dt_h), tl.load(dt_bias_ptr + pid_h),
                           dt_min, dt_max)
    A = tl.load(A_ptr + pid_h).to(tl.float32)
    D = tl.load(D_ptr + pid_h).to(tl.float32)
    B = tl.load(B_ptr + pid_b * stride_B_b + group * stride_B_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + pid_b * stride_C_b + group * stride_C_g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if PDL:         # every input is read: the next kernel may start on what does not depend on this one
        tl.extra.cuda.gdc_launch_dependents()

    h = h * tl.exp(dt * A) + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask)
    y = tl.sum(h * C[None, :], axis=1) + D * x
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_p)


@dataclass(frozen=True)
class StepLaunch:
    """The decode step's launch; ``selective_state_update`` reads the module's ``STEP_LAUNCH``, and
    ``python -m bench.bench_kernels --tune`` times variants on a GPU. None: a (headdim block, warps) per
    dstate that keeps a program's state block in registers: mamba_ssm's, except at dstate 128 (Nemotron-H),
    where 32 rows and 4 warps ran at 79-88% of an H200's copy bandwidth from batch 16 to 256 in a tuning
    run, against 45-66% for mamba_ssm's 4 rows."""

    block_p: int | None = None    # headdim rows per program
    num_warps: int | None = None
    # Programmatic dependent launch (sm_90 and up; ignored elsewhere): the step may start while the kernel
    # before it runs, and reads its state meanwhile. That kernel must not write the state (in the engine it
    # is the conv update); two steps launched back to back on one state would race.
    pdl: bool = False


def dependent_launch_supported(device: torch.device) -> bool:
    """Whether ``StepLaunch.pdl`` applies on ``device``: griddepcontrol needs compute capability 9.0."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


STEP_LAUNCH = StepLaunch()


def _state_update_fwd(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, slot_idx: torch.Tensor | None,
                      dt_limit: tuple[float, float], y: torch.Tensor) -> None:
    """Launches the step with ``STEP_LAUNCH``."""
    batch, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1:]
    block_p, num_warps = ((32, 4) if dstate <= 16 else (16, 4) if dstate <= 32 else (8, 4) if dstate <= 64
                          else (32, 4) if dstate <= 128 else (4, 8))
    block_p, num_warps = STEP_LAUNCH.block_p or block_p, STEP_LAUNCH.num_warps or num_warps
    pdl = STEP_LAUNCH.pdl and dependent_launch_supported(x.device)
    _state_update_kernel[(triton.cdiv(headdim, block_p), batch, nheads)](
        state, x, dt, A, B, C, D, dt_bias, slot_idx, y,
        headdim, dstate, nheads // ngroups, float(dt_limit[0]), float(dt_limit[1]),
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1), dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), C.stride(0), C.stride(1), y.stride(0), y.stride(1),
        HAS_SLOTS=slot_idx is not None, PDL=pdl, BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(dstate),
        num_warps=num_warps, launch_pdl=pdl)


def selective_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, *,
                           slot_idx: torch.Tensor | None,
                           dt_limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """One recurrent step, Triton.

    state: [nslots, nheads, headdim, dstate] (fp32 by default), updated in place;
    x: [batch, nheads, headdim]; dt: [batch, nheads] (before bias and softplus); A, D, dt_bias: [nheads];
    B, C: [batch, ngroups, dstate]; slot_idx: [batch] int, the state slot of each row (< 0: padding),
    or None: row i is slot i (the first ``batch`` slots, read and written in place without a gather).
    Returns y: [batch, nheads, headdim] in x's dtype (zeros on padding rows).
    """
    if state.stride(-1) != 1:
        raise ValueError("state must be contiguous in dstate: it is updated in place")
    if x.shape[1] % B.shape[1]:
        raise ValueError(f"nheads ({x.shape[1]}) must be a multiple of ngroups ({B.shape[1]})")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    slots = None if slot_idx is None else slot_idx.contiguous()
    _state_update_fwd(state, _inner_contiguous(x), dt, A.contiguous(), _inner_contiguous(B), _inner_contiguous(C),
                      D.contiguous(), dt_bias.contiguous(), slots, dt_limit, y)
    return y


def selective_state_update_ref(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                               B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, *,
                               slot_idx: torch.Tensor | None,
                               dt_limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """One recurrent step, PyTorch reference.

    state: [nslots, nheads, headdim, dstate] (fp32 by default), updated in place;
    x: [batch, nheads, headdim]; dt: [batch, nheads] (before bias and softplus); A, D, dt_bias: [nheads];
    B, C: [batch, ngroups, dstate]; slot_idx: [batch] int, the state slot of each row (< 0: padding),
    or None: row i is slot i (the first ``batch`` slots, read and written in place without a gather).
    Returns y: [batch, nheads, headdim] in x's dtype (zeros on padding rows).
    """
    batch, nheads, headdim = x.shape
    groups = B.shape[1]
    dt = _discretize_dt(dt, dt_bias, dt_limit).view(batch, groups, -1, 1, 1)       # heads split by group
    xg = x.float().view(batch, groups, -1, headdim, 1)
    h = state[:batch] if slot_idx is None else state[slot_idx.clamp(min=0)]
    h = h.float().view(batch, groups, -1, headdim, B.shape[-1])
    decay, inflow = torch.exp(dt * A.float().view(1, groups, -1, 1, 1)), (dt * xg) * B.float()[:, :, None, None]
    # Eager, an fp32 state's first rows are updated where they lie (.float() is then a view). Compiled, they
    # are written back as a slice instead: updating a view of the state in place would make the compiled
    # step copy the whole state buffer, every slot, after each step.
    in_place = slot_idx is None and state.dtype == torch.float32 and not torch.compiler.is_compiling()
    h = h.mul_(decay).add_(inflow) if in_place else h * decay + inflow
    y = torch.einsum("bghpn,bgn->bghp", h, C.float()) + D.float().view(1, groups, -1, 1) * xg[..., 0]
    y, h = y.view(x.shape), h.view(batch, nheads, headdim, -1).to(state.dtype)
    if slot_idx is None:
        if not in_place:
            state[:batch] = h
        return y.to(x.dtype)
    valid = slot_idx >= 0
    state[slot_idx[valid]] = h[valid]                      # boolean indexing, no branch: compiles whole
    return (y * valid[:, None, None]).to(x.dtype)
