"""Causal depthwise conv1d of a Mamba-2 layer: prefill over packed prompts and the one-token update.

Prefill returns, per sequence, the last ``width - 1`` inputs: that is the whole conv state a sequence
needs for decoding, kept in a preallocated ``[nslots, dim, width - 1]`` buffer and addressed by slot.

The Triton prefill tiles each sequence into blocks of tokens with the SSD scan's chunk table, so no block
straddles two sequences and a token's window simply stops at its sequence's start; the block that ends a
sequence also writes that sequence's conv state, so prefill needs no second pass to hand off to decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rollout.kernels.ssd_scan import _chunk_table, _flat_cu_seqlens, _inner_contiguous, _owners


@triton.jit
def _conv1d_kernel(
    # Pointers
    x_ptr, weight_ptr, bias_ptr, chunk_start_ptr, chunk_len_ptr, chunk_seq_ptr, cu_seqlens_ptr, out_ptr,
    states_ptr,
    # Dimensions
    dim,
    # Strides
    stride_x_t, stride_w_d, stride_o_t, stride_s_s, stride_s_d,
    # Meta-parameters
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """out for a (tokens, channels) block of one sequence, in fp32."""
    pid_c = tl.program_id(0).to(tl.int64)
    length = tl.load(chunk_len_ptr + pid_c)
    if length == 0:     # a spare row of the chunk table
        return
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    start = tl.load(chunk_start_ptr + pid_c)
    seq = tl.load(chunk_seq_ptr + pid_c)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seq_end = tl.load(cu_seqlens_ptr + seq + 1)
    mask_d = offs_d < dim
    mask_t = offs_t < length

    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(WIDTH):
        pos = start + offs_t - (WIDTH - 1) + k
        xk = tl.load(x_ptr + pos[:, None] * stride_x_t + offs_d[None, :],
                     mask=(mask_t & (pos >= seq_start))[:, None] & mask_d[None, :], other=0.0)
        wk = tl.load(weight_ptr + offs_d * stride_w_d + k, mask=mask_d, other=0.0)
        acc += xk.to(tl.float32) * wk.to(tl.float32)[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + (start + offs_t)[:, None] * stride_o_t + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_d[None, :])

    if start + length == seq_end:   # the sequence's last block keeps its last WIDTH - 1 inputs for decoding
        offs_w = tl.arange(0, BLOCK_W)
        kept_pos = seq_end - (WIDTH - 1) + offs_w
        mask_w = mask_d[:, None] & (offs_w < WIDTH - 1)[None, :]
        kept = tl.load(x_ptr + kept_pos[None, :] * stride_x_t + offs_d[:, None],
                       mask=mask_w & (kept_pos >= seq_start)[None, :], other=0.0)    # zeros before the sequence
        tl.store(states_ptr + seq * stride_s_s + offs_d[:, None] * stride_s_d + offs_w[None, :], kept, mask=mask_w)


@triton.jit
def _conv1d_update_kernel(
    # Pointers
    x_ptr, state_ptr, weight_ptr, bias_ptr, slot_ptr, out_ptr,
    # Dimensions
    dim,
    # Strides
    stride_x_b, stride_s_slot, stride_s_d, stride_s_w, stride_w_d, stride_w_w, stride_o_b,
    # Meta-parameters
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SLOTS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One token through the conv for a block of channels of one row, shifting its slot's state."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
    mask_d = offs_d < dim
    out_ptrs = out_ptr + pid_b * stride_o_b + offs_d
    slot = tl.load(slot_ptr + pid_b).to(tl.int64) if HAS_SLOTS else pid_b   # no slot index: row i is slot i
    if slot < 0:    # a padding row: zeros out, no state read or written
        tl.store(out_ptrs, tl.zeros((BLOCK_D,), dtype=out_ptr.dtype.element_ty), mask=mask_d)
        return

    rows = state_ptr + slot * stride_s_slot + offs_d[:, None] * stride_s_d
    mask = mask_d[:, None]
    # As the reference: the new input joins the window in the state's dtype.
    x = tl.load(x_ptr + pid_b * stride_x_b + offs_d, mask=mask_d, other=0.0).to(state_ptr.dtype.element_ty)[:, None]

    # window: the WIDTH - 1 kept inputs then x; shifted: the window one step on, the new state.
    window = tl.load(rows + offs_w[None, :] * stride_s_w, mask=mask & (offs_w < WIDTH - 1)[None, :], other=0.0)
    window = tl.where(offs_w[None, :] == WIDTH - 1, x, window)
    shifted = tl.load(rows + (offs_w[None, :] + 1) * stride_s_w, mask=mask & (offs_w < WIDTH - 2)[None, :], other=0.0)
    shifted = tl.where(offs_w[None, :] == WIDTH - 2, x, shifted)
    weight = tl.load(weight_ptr + offs_d[:, None] * stride_w_d + offs_w[None, :] * stride_w_w,
                     mask=mask_d[:, None] & (offs_w < WIDTH)[None, :], other=0.0)
    y = tl.sum(window.to(tl.float32) * weight.to(tl.float32), axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(rows + offs_w[None, :] * stride_s_w, shifted, mask=mask & (offs_w < WIDTH - 1)[None, :])
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_d)


_BLOCK_T, _BLOCK_D = 64, 64


def _conv1d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor,
                silu: bool, out: torch.Tensor, states: torch.Tensor) -> None:
    """Launches the prefill conv over packed tokens: x and out [T, dim], cu_seqlens [nseq + 1] int64,
    states [nseq, dim, width - 1] (zeros, which an empty sequence keeps)."""
    ntokens, dim = x.shape
    width = weight.shape[1]
    start, length, seq = _chunk_table(cu_seqlens, ntokens, _BLOCK_T)
    _conv1d_kernel[(start.numel(), triton.cdiv(dim, _BLOCK_D))](
        x, weight, bias, start, length, seq, cu_seqlens, out, states,
        dim,
        x.stride(0), weight.stride(0), out.stride(0), states.stride(0), states.stride(1),
        WIDTH=width, HAS_BIAS=bias is not None, SILU=silu, BLOCK_T=_BLOCK_T, BLOCK_D=_BLOCK_D,
        BLOCK_W=triton.next_power_of_2(width - 1))


def _conv1d_update_fwd(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       slot_idx: torch.Tensor | None, silu: bool, out: torch.Tensor) -> None:
    """Launches the one-token conv: one program per (row, channel block)."""
    batch, dim = x.shape
    width = weight.shape[1]
    _conv1d_update_kernel[(batch, triton.cdiv(dim, _BLOCK_D))](
        x, conv_state, weight, bias, slot_idx, out,
        dim,
        x.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), weight.stride(0),
        weight.stride(1), out.stride(0),
        WIDTH=width, HAS_BIAS=bias is not None, HAS_SLOTS=slot_idx is not None, SILU=silu, BLOCK_D=_BLOCK_D,
        BLOCK_W=triton.next_power_of_2(width))


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                  cu_seqlens: torch.Tensor | None = None,
                  silu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over each sequence from a zero state, Triton.

    x: [batch, seqlen, dim]; weight: [dim, width]; bias: [dim] or None; cu_seqlens: [nseq + 1] offsets
    of packed sequences in row 0 (batch 1), or None (nseq = batch). Returns out: [batch, seqlen, dim]
    (SiLU applied when ``silu``) and conv_states: [nseq, dim, width - 1], each sequence's last inputs
    (zero-padded on the left when it is shorter than width - 1).
    """
    batch, seqlen, dim = x.shape
    cu = _flat_cu_seqlens(batch, seqlen, cu_seqlens, x.device)
    out = torch.empty(batch * seqlen, dim, dtype=x.dtype, device=x.device)
    states = torch.zeros(cu.numel() - 1, dim, weight.shape[1] - 1, dtype=x.dtype, device=x.device)
    _conv1d_fwd(_inner_contiguous(x.reshape(batch * seqlen, dim)), _inner_contiguous(weight), bias, cu, silu, out,
                states)
    return out.view(batch, seqlen, dim), states


def causal_conv1d_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, *, slot_idx: torch.Tensor | None,
                         silu: bool = True) -> torch.Tensor:
    """One token per sequence through the conv, shifting its slot's state in place; Triton.

    x: [batch, dim]; conv_state: [nslots, dim, width - 1], any strides, updated in place; weight: [dim, width],
    any strides; bias: [dim] or None; slot_idx: [batch] int (< 0: padding row, zeros out, no state change), or None:
    row i is slot i (the first ``batch`` slots, read and written in place without a gather).
    Returns out: [batch, dim] in x's dtype.
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _conv1d_update_fwd(_inner_contiguous(x), conv_state, weight, bias,
                       None if slot_idx is None else slot_idx.contiguous(), silu, out)
    return out


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                      cu_seqlens: torch.Tensor | None = None,
                      silu: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv over each sequence from a zero state, PyTorch reference.

    x: [batch, seqlen, dim]; weight: [dim, width]; bias: [dim] or None; cu_seqlens: [nseq + 1] offsets
    of packed sequences in row 0 (batch 1), or None (nseq = batch). Returns out: [batch, seqlen, dim]
    (SiLU applied when ``silu``) and conv_states: [nseq, dim, width - 1], each sequence's last inputs
    (zero-padded on the left when it is shorter than width - 1).

    Each sequence is laid out after ``width - 1`` zero rows (its zero initial state), so no window reaches
    into the sequence before it, and the conv is ``width`` shifted multiply-adds over the whole stream:
    summed in fp32, rounded once to the weight's dtype, as a conv layer does.
    """
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    cu = _flat_cu_seqlens(batch, seqlen, cu_seqlens, x.device)
    nseq, ntokens = len(cu) - 1, batch * seqlen
    row = torch.arange(ntokens, device=x.device) + (width - 1) * (_owners(cu, ntokens) + 1)  # its row in the stream
    stream = x.new_zeros(ntokens + (width - 1) * nseq, dim, dtype=torch.float32)
    stream.index_copy_(0, row, x.reshape(ntokens, dim).float())
    windows = len(stream) - width + 1                                          # window r ends at row r + width - 1
    y = torch.zeros(windows, dim, device=x.device) if bias is None else bias.float().expand(windows, dim).clone()
    taps = weight.float().t().contiguous()     # [width, dim]: a tap's weights contiguous, 2-3x faster to multiply
    for k in range(width):
        y.addcmul_(stream[k: k + windows], taps[k])
    y = y.index_select(0, row - (width - 1)).to(weight.dtype)
    out = (F.silu(y) if silu else y).to(x.dtype).view(batch, seqlen, dim)
    # each sequence's last width - 1 rows of the stream (its zero rows where it is shorter)
    last = cu[1:] - 1 + (width - 1) * torch.arange(1, nseq + 1, device=x.device)
    states = stream[last[:, None] - (width - 2) + torch.arange(width - 1, device=x.device)]
    return out, states.to(x.dtype).transpose(1, 2)


def causal_conv1d_update_ref(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None, *, slot_idx: torch.Tensor | None,
                             silu: bool = True) -> torch.Tensor:
    """One token per sequence through the conv, shifting its slot's state in place; PyTorch reference.

    x: [batch, dim]; conv_state: [nslots, dim, width - 1], any strides, updated in place; weight: [dim, width],
    any strides; bias: [dim] or None; slot_idx: [batch] int (< 0: padding row, zeros out, no state change), or None:
    row i is slot i (the first ``batch`` slots, read and written in place without a gather).
    Returns out: [batch, dim] in x's dtype.
    """
    states = conv_state[: x.shape[0]] if slot_idx is None else conv_state[slot_idx.clamp(min=0)]
    # Tap-major, [batch, width, dim]: each tap's channels side by side, so the multiply-add runs along dim.
    # The engine stores its conv states so (a [nslots, width - 1, dim] buffer seen through a transposed
    # view); compiled on CPU, the window then needs no strided loads.
    window = torch.cat([states.transpose(1, 2), x[:, None].to(conv_state.dtype)], dim=1)
    y = (window.to(weight.dtype) * weight.t()).sum(1)
    if bias is not None:
        y = y + bias
    y = F.silu(y) if silu else y
    if slot_idx is None:
        conv_state[: x.shape[0]] = window[:, 1:].transpose(1, 2)
        return y.to(x.dtype)
    valid = slot_idx >= 0
    conv_state[slot_idx[valid]] = window[valid, 1:].transpose(1, 2)
    return (y * valid[:, None]).to(x.dtype)
