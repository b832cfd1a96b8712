"""Chunked SSD scan (Mamba-2 "state space duality") for prefill.

For each head the recurrence is ``h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t ⊗ B_t`` and
``y_t = C_t · h_t + D * x_t``. The chunked form computes it as a masked quadratic form inside each chunk
of ``chunk_size`` tokens plus one state hand-off per chunk, which is what makes prefill fast. Several
prompts can be packed into one row with ``cu_seqlens``: each starts from its own initial state (zero by
default), none sees another's tokens, and each gets its own final state back for decoding.

The Triton op runs four kernels, as mamba_ssm does: chunk cumsum (dt and its running decay), chunk state
(what each chunk adds to the state), state passing (the only serial loop, per sequence over its chunks)
and chunk scan (the outputs); the chunk cumsum also writes the chunk table the others read. Unlike
mamba_ssm, chunks are cut per sequence (as in the reference, and vLLM's varlen design): a chunk never
holds two sequences, so a packed row needs no in-kernel resets, the state passing starts each sequence
from its own initial state and ends on its own final state. By default C·Bᵀ is computed inside the
chunk scan, per head; ``ScanLaunch.precompute_cb`` computes it once per chunk and group in a kernel of
its own, as mamba_ssm does, which frees the chunk scan's registers that held C (slower on an H200 at
Nemotron-H shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _discretize_dt_tl(dt, dt_bias, dt_min, dt_max):
    """softplus(dt + dt_bias) clamped to [dt_min, dt_max] in fp32, as ``_discretize_dt`` (PyTorch's softplus
    is the identity past 20, and exp would overflow there)."""
    dt = dt.to(tl.float32) + dt_bias.to(tl.float32)
    dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    return tl.minimum(tl.maximum(dt, dt_min), dt_max)


@triton.jit
def _chunk_rows(cu_seqlens_ptr, cu_chunks_ptr, rows, nseq, write_cu_chunks,
                CHUNK: tl.constexpr, BLOCK_S: tl.constexpr):
    """The chunk table's entries for ``rows`` (int64 chunk indices): each chunk's first token, length and
    sequence. Chunks are cut from each sequence's start, so a chunk never holds two sequences. Sequences are
    walked in blocks, each block's chunk offsets a running sum of ``ceil(length / CHUNK)``, and a row takes
    the values of the sequence whose chunks cover it (rows past the real chunks get 0). The scan's chunk
    cumsum computes its rows this way, so the table costs it no launch of its own; ``write_cu_chunks`` (one
    program) also stores each sequence's chunk offsets, which the state passing walks."""
    start = tl.zeros_like(rows)
    length = tl.zeros_like(rows)
    seq = tl.zeros_like(rows)
    done = tl.sum(start, axis=0)    # chunks of the sequences before this block of them (an int64 zero)
    if write_cu_chunks:
        tl.store(cu_chunks_ptr, done)
    for s0 in range(0, nseq, BLOCK_S):
        seqs = s0 + tl.arange(0, BLOCK_S)
        valid = seqs < nseq
        lo = tl.load(cu_seqlens_ptr + seqs, mask=valid, other=0)
        hi = tl.load(cu_seqlens_ptr + seqs + 1, mask=valid, other=0)
        counts = (hi - lo + CHUNK - 1) // CHUNK
        ends = done + tl.cumsum(counts, axis=0)
        covers = (rows[:, None] >= (ends - counts)[None, :]) & (rows[:, None] < ends[None, :])
        at = lo[None, :] + (rows[:, None] - (ends - counts)[None, :]) * CHUNK
        start += tl.sum(tl.where(covers, at, 0), axis=1)
        length += tl.sum(tl.where(covers, tl.minimum(hi[None, :] - at, CHUNK), 0), axis=1)
        seq += tl.sum(tl.where(covers, seqs[None, :].to(tl.int64), 0), axis=1)
        if write_cu_chunks:
            tl.store(cu_chunks_ptr + 1 + seqs, ends, mask=valid)
        done += tl.sum(counts, axis=0)
    return start, length, seq


@triton.jit
def _chunk_table_kernel(
    # Pointers
    cu_seqlens_ptr, chunk_start_ptr, chunk_len_ptr, chunk_seq_ptr,
    # Dimensions
    nseq, nrows,
    # Meta-parameters
    CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """The chunk table's rows of one block, for a kernel with many programs per chunk (the prefill conv1d
    has one per block of channels), where a walk over the sequences in each program would be repeated."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    start, length, seq = _chunk_rows(cu_seqlens_ptr, cu_seqlens_ptr, rows, nseq, False, CHUNK, BLOCK_S)
    mask = rows < nrows
    tl.store(chunk_start_ptr + rows, start, mask=mask)
    tl.store(chunk_len_ptr + rows, length, mask=mask)
    tl.store(chunk_seq_ptr + rows, seq, mask=mask)


@triton.jit
def _chunk_row(cu_seqlens_ptr, cu_chunks_ptr, row, nseq, write_cu_chunks,
               CHUNK: tl.constexpr, BLOCK_S: tl.constexpr):
    """``_chunk_rows`` for the one chunk ``row`` of a program, as three int64 scalars."""
    rows = row + tl.zeros((1,), dtype=tl.int64)
    start, length, seq = _chunk_rows(cu_seqlens_ptr, cu_chunks_ptr, rows, nseq, write_cu_chunks, CHUNK, BLOCK_S)
    return tl.sum(start, axis=0), tl.sum(length, axis=0), tl.sum(seq, axis=0)


@triton.jit
def _chunk_cumsum_kernel(
    # Pointers
    dt_ptr, A_ptr, dt_bias_ptr, cu_seqlens_ptr, chunk_start_ptr, chunk_len_ptr, cu_chunks_ptr, dt_out_ptr,
    dA_cs_ptr,
    # Dimensions
    nheads, nseq, dt_min, dt_max,
    # Strides
    stride_dt_t, stride_dt_h, stride_out_h, stride_out_c,
    # Meta-parameters
    CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dt and the running sum of dt * A over one chunk, for a block of heads. Past the chunk's end dt is 0,
    so the last column of the running sum is the decay of the whole chunk. The first block of heads also
    writes the chunk's first token and length, for the kernels after this one."""
    pid_c = tl.program_id(0).to(tl.int64)
    first_heads = tl.program_id(1) == 0
    start, length, _ = _chunk_row(cu_seqlens_ptr, cu_chunks_ptr, pid_c, nseq, first_heads & (pid_c == 0),
                                  CHUNK, BLOCK_S)
    if first_heads:
        tl.store(chunk_start_ptr + pid_c, start)
        tl.store(chunk_len_ptr + pid_c, length)
    if length == 0:     # a spare row of the chunk table
        return
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_q = tl.arange(0, BLOCK_Q)
    mask_h = offs_h < nheads
    mask = mask_h[:, None] & (offs_q < length)[None, :]
    dt = tl.load(dt_ptr + (start + offs_q)[None, :] * stride_dt_t + offs_h[:, None] * stride_dt_h, mask=mask,
                 other=0.0)
    dt_bias = tl.load(dt_bias_ptr + offs_h, mask=mask_h, other=0.0)
    dt = tl.where(mask, _discretize_dt_tl(dt, dt_bias[:, None], dt_min, dt_max), 0.0)
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    dA_cs = tl.cumsum(dt * A[:, None], axis=1)
    out = offs_h[:, None] * stride_out_h + pid_c * stride_out_c + offs_q[None, :]
    mask_out = mask_h[:, None] & (offs_q < CHUNK)[None, :]
    tl.store(dt_out_ptr + out, dt, mask=mask_out)
    tl.store(dA_cs_ptr + out, dA_cs, mask=mask_out)


@triton.jit
def _chunk_state_kernel(
    # Pointers
    x_ptr, B_ptr, dt_ptr, dA_cs_ptr, chunk_start_ptr, chunk_len_ptr, states_ptr,
    # Dimensions
    headdim, dstate, heads_per_group,
    # Strides
    stride_x_t, stride_x_h, stride_B_t, stride_B_g, stride_dt_h, stride_dt_c, stride_s_c, stride_s_h, stride_s_p,
    # Meta-parameters
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The state one chunk leaves from a zero start, sum_k exp(dA_last - dA_k) dt_k x_k ⊗ B_k, for a
    (headdim, dstate) block of one head."""
    pid_pn = tl.program_id(0)
    pid_c = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2).to(tl.int64)
    length = tl.load(chunk_len_ptr + pid_c)
    if length == 0:     # a spare row of the chunk table, never read
        return
    blocks_n = tl.cdiv(dstate, BLOCK_N)
    offs_p = (pid_pn // blocks_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(chunk_start_ptr + pid_c)
    x_ptr += start * stride_x_t + pid_h * stride_x_h
    B_ptr += start * stride_B_t + (pid_h // heads_per_group) * stride_B_g
    dt_ptr += pid_h * stride_dt_h + pid_c * stride_dt_c
    dA_cs_ptr += pid_h * stride_dt_h + pid_c * stride_dt_c
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    dA_last = tl.load(dA_cs_ptr + CHUNK - 1)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, length, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < length
        xt = tl.load(x_ptr + offs_k[None, :] * stride_x_t + offs_p[:, None],
                     mask=mask_p[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        b = tl.load(B_ptr + offs_k[:, None] * stride_B_t + offs_n[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        dA_k = tl.load(dA_cs_ptr + offs_k, mask=mask_k, other=0.0)
        dt_k = tl.load(dt_ptr + offs_k, mask=mask_k, other=0.0)
        # The exponent is <= 0 in exact arithmetic; clamping keeps cumsum rounding from overflowing it.
        scale = tl.exp(tl.minimum(dA_last - dA_k, 0.0)) * dt_k
        acc += tl.dot(xt.to(DOT_DTYPE), (b * scale[:, None]).to(DOT_DTYPE), input_precision=DOT_PRECISION)
    tl.store(states_ptr + pid_c * stride_s_c + pid_h * stride_s_h + offs_p[:, None] * stride_s_p + offs_n[None, :],
             acc, mask=mask_p[:, None] & mask_n[None, :])


@triton.jit
def _state_passing_kernel(
    # Pointers
    states_ptr, dA_cs_ptr, cu_chunks_ptr, init_ptr, entering_ptr, final_ptr,
    # Dimensions
    state_size,
    # Strides
    stride_s_c, stride_s_h, stride_dA_h, stride_dA_c, stride_init_s, stride_init_h, stride_e_c, stride_e_h,
    stride_final_s, stride_final_h,
    # Meta-parameters
    CHUNK: tl.constexpr, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Carries one sequence's state across its chunks, in fp32: entering[c] is the state entering chunk c
    (in entering's dtype; it may be ``states`` itself, then replaced in place), states[c] what chunk c adds,
    and the state after the last chunk is the sequence's final state."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pid_s = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2).to(tl.int64)
    mask = offs < state_size
    if HAS_INIT:
        state = tl.load(init_ptr + pid_s * stride_init_s + pid_h * stride_init_h + offs, mask=mask,
                        other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(tl.load(cu_chunks_ptr + pid_s), tl.load(cu_chunks_ptr + pid_s + 1)):
        added = tl.load(states_ptr + c * stride_s_c + pid_h * stride_s_h + offs, mask=mask, other=0.0)
        tl.store(entering_ptr + c * stride_e_c + pid_h * stride_e_h + offs,
                 state.to(entering_ptr.dtype.element_ty), mask=mask)
        decay = tl.exp(tl.minimum(tl.load(dA_cs_ptr + pid_h * stride_dA_h + c * stride_dA_c + CHUNK - 1), 0.0))
        state = decay * state + added
    tl.store(final_ptr + pid_s * stride_final_s + pid_h * stride_final_h + offs, state, mask=mask)


@triton.jit
def _chunk_cb_kernel(
    # Pointers
    B_ptr, C_ptr, chunk_start_ptr, chunk_len_ptr, cb_ptr,
    # Dimensions
    dstate,
    # Strides
    stride_B_t, stride_B_g, stride_C_t, stride_C_g, stride_cb_c, stride_cb_g, stride_cb_m,
    # Meta-parameters
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_DSTATE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """C·Bᵀ of one chunk and group for a block of rows, every column: what each head of the group reads in
    the chunk scan (``ScanLaunch.precompute_cb``). Rows and columns past the chunk's end come out 0."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1).to(tl.int64)
    pid_g = tl.program_id(2).to(tl.int64)
    length = tl.load(chunk_len_ptr + pid_c)
    if length == 0:     # a spare row of the chunk table, never read
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_DSTATE)
    start = tl.load(chunk_start_ptr + pid_c)
    mask_n = offs_n < dstate
    c = tl.load(C_ptr + (start + offs_m)[:, None] * stride_C_t + pid_g * stride_C_g + offs_n[None, :],
                mask=(offs_m < length)[:, None] & mask_n[None, :], other=0.0)
    bt = tl.load(B_ptr + (start + offs_k)[None, :] * stride_B_t + pid_g * stride_B_g + offs_n[:, None],
                 mask=mask_n[:, None] & (offs_k < length)[None, :], other=0.0)
    cb = tl.dot(c.to(DOT_DTYPE), bt.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    tl.store(cb_ptr + pid_c * stride_cb_c + pid_g * stride_cb_g + offs_m[:, None] * stride_cb_m + offs_k[None, :],
             cb.to(cb_ptr.dtype.element_ty), mask=(offs_m < CHUNK)[:, None] & (offs_k < CHUNK)[None, :])


@triton.jit
def _chunk_scan_kernel(
    # Pointers
    x_ptr, B_ptr, C_ptr, dt_ptr, dA_cs_ptr, states_ptr, D_ptr, chunk_start_ptr, chunk_len_ptr, cb_ptr, y_ptr,
    # Dimensions
    headdim, dstate, heads_per_group,
    # Strides
    stride_x_t, stride_x_h, stride_B_t, stride_B_g, stride_C_t, stride_C_g, stride_dt_h, stride_dt_c,
    stride_s_c, stride_s_h, stride_s_p, stride_cb_c, stride_cb_g, stride_cb_m, stride_y_t, stride_y_h,
    # Meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DSTATE: tl.constexpr,
    PRECOMPUTED_CB: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """y for a (rows, headdim) block of one chunk and head: the entering state read through C and decayed
    to each row, plus the causal in-chunk term sum_{k<=m} (C_m·B_k) exp(dA_m - dA_k) dt_k x_k, plus D x."""
    pid_mp = tl.program_id(0)
    pid_c = tl.program_id(1).to(tl.int64)
    pid_h = tl.program_id(2).to(tl.int64)
    blocks_p = tl.cdiv(headdim, BLOCK_P)
    pid_m = pid_mp // blocks_p
    length = tl.load(chunk_len_ptr + pid_c)
    if pid_m * BLOCK_M >= length:   # rows past the chunk's end, or a spare row of the chunk table
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = (pid_mp % blocks_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_DSTATE)
    start = tl.load(chunk_start_ptr + pid_c)
    group = pid_h // heads_per_group
    x_ptr += start * stride_x_t + pid_h * stride_x_h
    B_ptr += start * stride_B_t + group * stride_B_g
    C_ptr += start * stride_C_t + group * stride_C_g
    dt_ptr += pid_h * stride_dt_h + pid_c * stride_dt_c
    dA_cs_ptr += pid_h * stride_dt_h + pid_c * stride_dt_c
    cb_ptr += pid_c * stride_cb_c + group * stride_cb_g
    mask_m = offs_m < length
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate

    dA_m = tl.load(dA_cs_ptr + offs_m, mask=mask_m, other=0.0)
    c = tl.load(C_ptr + offs_m[:, None] * stride_C_t + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                other=0.0).to(DOT_DTYPE)
    entering = tl.load(states_ptr + pid_c * stride_s_c + pid_h * stride_s_h + offs_p[None, :] * stride_s_p
                       + offs_n[:, None], mask=mask_n[:, None] & mask_p[None, :], other=0.0)
    acc = tl.dot(c, entering.to(DOT_DTYPE), input_precision=DOT_PRECISION) * tl.exp(tl.minimum(dA_m, 0.0))[:, None]

    for k0 in range(0, tl.minimum((pid_m + 1) * BLOCK_M, length), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < length
        if PRECOMPUTED_CB:
            cb = tl.load(cb_ptr + offs_m[:, None] * stride_cb_m + offs_k[None, :],
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        else:
            bt = tl.load(B_ptr + offs_k[None, :] * stride_B_t + offs_n[:, None],
                         mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
            cb = tl.dot(c, bt, input_precision=DOT_PRECISION)
        dA_k = tl.load(dA_cs_ptr + offs_k, mask=mask_k, other=0.0)
        dt_k = tl.load(dt_ptr + offs_k, mask=mask_k, other=0.0)
        scale = tl.exp(tl.minimum(dA_m[:, None] - dA_k[None, :], 0.0)) * dt_k[None, :]
        cb = tl.where(offs_m[:, None] >= offs_k[None, :], cb * scale, 0.0)
        xk = tl.load(x_ptr + offs_k[:, None] * stride_x_t + offs_p[None, :], mask=mask_k[:, None] & mask_p[None, :],
                     other=0.0).to(DOT_DTYPE)
        acc += tl.dot(cb.to(DOT_DTYPE), xk, input_precision=DOT_PRECISION)

    mask = mask_m[:, None] & mask_p[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_x_t + offs_p[None, :], mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(D_ptr + pid_h).to(tl.float32) * x
    tl.store(y_ptr + (start + offs_m)[:, None] * stride_y_t + pid_h * stride_y_h + offs_p[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class ScanLaunch:
    """Block sizes and launch settings of the scan's kernels. ``ssd_scan`` reads the module's ``LAUNCH``;
    ``python -m bench.bench_kernels --tune`` times variants on a GPU. The defaults are the fastest of 41
    variants timed on an H200 at Nemotron-H-8B shapes (batch 4 x 8,192 tokens, bf16), kernel by kernel."""

    state_block_k: int = 32      # tokens per step of the chunk-state loop
    state_block_n: int = 64      # dstate columns per chunk-state program
    state_warps: int = 4
    state_stages: int = 3        # software-pipeline stages of the chunk-state loop
    passing_block: int = 512     # state elements per state-passing program
    passing_warps: int = 4
    scan_block_m: int = 64       # rows (tokens) of a chunk per chunk-scan program
    scan_block_k: int = 16       # tokens per step of the chunk-scan loop
    scan_warps: int = 4          # of the chunk scan and of the C·Bᵀ kernel
    scan_stages: int = 2         # likewise
    # C·Bᵀ of each chunk and group in a kernel of its own, written out and read by each of the group's heads
    # (mamba_ssm's way), instead of computed again per head inside the chunk scan.
    precompute_cb: bool = False
    # bf16/fp16 inputs on a GPU: dot operands in that dtype with fp32 accumulation, as mamba_ssm does,
    # instead of fp32 operands at TF32 (Triton's interpreter multiplies bf16 operands as raw bits, so the
    # CPU path always keeps fp32 operands). The states entering each chunk, which the chunk scan only reads
    # as a dot operand, are then written in that dtype too, to a buffer of their own: half the bytes. The
    # state carried from chunk to chunk and the final states stay fp32.
    low_precision: bool = True


# With these the tl.dot kernels compile for sm_90 at Nemotron-H shapes (headdim 64, dstate 128, chunk 128)
# with no register spills for bf16 operands (cuobjdump -res-usage: chunk scan 178 registers, chunk state 226);
# fp32 operands (fp32 inputs) spill 48 bytes in the chunk scan.
LAUNCH = ScanLaunch()


def _block(size: int, cap: int) -> int:
    """A power-of-two block covering ``size`` up to ``cap``, at least 16 (the smallest tl.dot operand)."""
    return max(16, min(cap, triton.next_power_of_2(size)))


def _dot_precision(dtype: torch.dtype) -> str:
    """The precision of fp32 dot operands. fp32 inputs keep fp32 products (parity with the reference). bf16/fp16
    inputs, whose operands are fp32 unless ``ScanLaunch.low_precision``, use TF32, which holds them exactly,
    so C·Bᵀ is exact and only the fp32 operands (states, decay-scaled terms) are rounded to TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


_LOW_PRECISION = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels step the innermost dimension with unit stride; every other stride is passed."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _flat_cu_seqlens(batch: int, seqlen: int, cu_seqlens: torch.Tensor | None,
                     device: torch.device) -> torch.Tensor:
    """int64 sequence offsets over the batch * seqlen flattened tokens: one sequence per row, or row 0's
    packed ones; either way the kernels only ever see packed sequences."""
    if cu_seqlens is None:
        return torch.arange(0, (batch + 1) * seqlen, seqlen, device=device, dtype=torch.int64)
    if batch != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch 1, got {batch}")
    return cu_seqlens.to(device=device, dtype=torch.int64)


def _max_chunks(ntokens: int, nseq: int, chunk_size: int) -> int:
    """The chunk table's rows: at most this many chunks cut ``ntokens`` into ``nseq`` sequences, so the
    table needs no host sync to size. Rows past the real chunks get length 0."""
    return (ntokens + nseq * (chunk_size - 1)) // chunk_size


_TABLE_ROWS = 128      # chunk-table rows per program of _chunk_table_kernel


def _chunk_table(cu_seqlens: torch.Tensor, ntokens: int,
                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per chunk its first token, length and sequence, in one launch of their own (see
    ``_chunk_table_kernel``; the scan's chunk cumsum writes them itself)."""
    nseq = cu_seqlens.numel() - 1
    nrows = _max_chunks(ntokens, nseq, chunk_size)
    start, length, seq = torch.empty(3, nrows, dtype=torch.int64, device=cu_seqlens.device)
    _chunk_table_kernel[(triton.cdiv(nrows, _TABLE_ROWS),)](
        cu_seqlens, start, length, seq, nseq, nrows,
        CHUNK=chunk_size, BLOCK_R=_TABLE_ROWS, BLOCK_S=_block(nseq, 64))
    return start, length, seq


class Chunks(NamedTuple):
    """What the chunk cumsum writes: the chunk table the scan reads (per chunk its first token and length,
    per sequence its chunk offsets), and dt and the running sum of dt * A, each [nchunks, nheads, chunk]."""

    start: torch.Tensor
    length: torch.Tensor
    cu_chunks: torch.Tensor
    dt: torch.Tensor
    dA_cs: torch.Tensor


def _chunk_cumsum(dt: torch.Tensor, A: torch.Tensor, dt_bias: torch.Tensor, cu_seqlens: torch.Tensor,
                  chunk_size: int, dt_limit: tuple[float, float]) -> Chunks:
    """Launches the chunk cumsum over packed tokens, dt [T, H]: the first kernel of the scan, one launch."""
    ntokens, nheads = dt.shape
    nseq = cu_seqlens.numel() - 1
    nchunks = _max_chunks(ntokens, nseq, chunk_size)
    start, length = torch.empty(2, nchunks, dtype=torch.int64, device=dt.device)
    cu_chunks = torch.empty(nseq + 1, dtype=torch.int64, device=dt.device)
    dt_out, dA_cs = torch.empty(2, nchunks, nheads, chunk_size, dtype=torch.float32, device=dt.device)
    block_h = _block(nheads, 16)
    _chunk_cumsum_kernel[(nchunks, triton.cdiv(nheads, block_h))](
        dt, A, dt_bias, cu_seqlens, start, length, cu_chunks, dt_out, dA_cs,
        nheads, nseq, float(dt_limit[0]), float(dt_limit[1]),
        dt.stride(0), dt.stride(1), dt_out.stride(1), dt_out.stride(0),
        CHUNK=chunk_size, BLOCK_H=block_h, BLOCK_Q=triton.next_power_of_2(chunk_size), BLOCK_S=_block(nseq, 64))
    return Chunks(start, length, cu_chunks, dt_out, dA_cs)


def _ssd_scan_fwd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor, dt_bias: torch.Tensor, initial_states: torch.Tensor | None,
                  cu_seqlens: torch.Tensor, chunk_size: int,
                  dt_limit: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the four kernels over packed tokens: x [T, H, P], dt [T, H], B and C [T, G, N], cu_seqlens
    [S + 1] int64, initial_states [S, H, P * N] or None. Returns y [T, H, P] and final states [S, H, P, N]."""
    ntokens, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1:]
    nseq = cu_seqlens.numel() - 1
    per_group, precision = nheads // ngroups, _dot_precision(x.dtype)
    launch = LAUNCH
    low = launch.low_precision and x.is_cuda and x.dtype in _LOW_PRECISION
    dots = dict(DOT_DTYPE=_LOW_PRECISION[x.dtype] if low else tl.float32, DOT_PRECISION=precision)
    # Each buffer is allocated just before the kernel that fills it: the host's work until the chunk state,
    # the first long kernel, is time the device waits for when the scan starts from idle.
    start, length, cu_chunks, dt_out, dA_cs = _chunk_cumsum(dt, A, dt_bias, cu_seqlens, chunk_size, dt_limit)
    nchunks = start.numel()
    states = torch.empty(nchunks, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
    block_p, block_n = _block(headdim, 64), _block(dstate, launch.state_block_n)
    grid = (triton.cdiv(headdim, block_p) * triton.cdiv(dstate, block_n), nchunks, nheads)
    _chunk_state_kernel[grid](
        x, B, dt_out, dA_cs, start, length, states,
        headdim, dstate, per_group,
        x.stride(0), x.stride(1), B.stride(0), B.stride(1), dt_out.stride(1), dt_out.stride(0),
        states.stride(0), states.stride(1), states.stride(2),
        CHUNK=chunk_size, BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_K=_block(chunk_size, launch.state_block_k),
        num_warps=launch.state_warps, num_stages=launch.state_stages, **dots)

    block = _block(headdim * dstate, launch.passing_block)
    final = torch.empty(nseq, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
    init = initial_states if initial_states is not None else final    # a placeholder pointer when absent
    entering = torch.empty_like(states, dtype=x.dtype) if low else states
    _state_passing_kernel[(triton.cdiv(headdim * dstate, block), nseq, nheads)](
        states, dA_cs, cu_chunks, init, entering, final,
        headdim * dstate,
        states.stride(0), states.stride(1), dA_cs.stride(1), dA_cs.stride(0), init.stride(0), init.stride(1),
        entering.stride(0), entering.stride(1), final.stride(0), final.stride(1),
        CHUNK=chunk_size, HAS_INIT=initial_states is not None, BLOCK=block, num_warps=launch.passing_warps)

    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    block_m, block_dstate = _block(chunk_size, launch.scan_block_m), triton.next_power_of_2(max(dstate, 16))
    cb = y      # a placeholder pointer when the chunk scan computes C·Bᵀ itself
    if launch.precompute_cb:
        cb = torch.empty(nchunks, ngroups, chunk_size, chunk_size, device=x.device,
                         dtype=x.dtype if low else torch.float32)
        _chunk_cb_kernel[(triton.cdiv(chunk_size, block_m), nchunks, ngroups)](
            B, C, start, length, cb,
            dstate,
            B.stride(0), B.stride(1), C.stride(0), C.stride(1), cb.stride(0), cb.stride(1), cb.stride(2),
            CHUNK=chunk_size, BLOCK_M=block_m, BLOCK_Q=max(16, triton.next_power_of_2(chunk_size)),
            BLOCK_DSTATE=block_dstate, num_warps=launch.scan_warps, num_stages=launch.scan_stages, **dots)
    grid = (triton.cdiv(chunk_size, block_m) * triton.cdiv(headdim, block_p), nchunks, nheads)
    _chunk_scan_kernel[grid](
        x, B, C, dt_out, dA_cs, entering, D, start, length, cb, y,
        headdim, dstate, per_group,
        x.stride(0), x.stride(1), B.stride(0), B.stride(1), C.stride(0), C.stride(1), dt_out.stride(1),
        dt_out.stride(0), entering.stride(0), entering.stride(1), entering.stride(2),
        *(cb.stride()[:3] if launch.precompute_cb else (0, 0, 0)), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_K=_block(chunk_size, launch.scan_block_k), BLOCK_DSTATE=block_dstate,
        PRECOMPUTED_CB=launch.precompute_cb, num_warps=launch.scan_warps, num_stages=launch.scan_stages, **dots)
    return y, final


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor, dt_bias: torch.Tensor, *, chunk_size: int,
             dt_limit: tuple[float, float] = (0.0, float("inf")),
             initial_states: torch.Tensor | None = None,
             cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan, Triton.

    x: [batch, seqlen, nheads, headdim]; dt: [batch, seqlen, nheads] (before bias and softplus);
    A: [nheads] (negative); B, C: [batch, seqlen, ngroups, dstate] (nheads a multiple of ngroups);
    D, dt_bias: [nheads]; initial_states: [nseq, nheads, headdim, dstate] or None (zeros);
    cu_seqlens: [nseq + 1] int offsets of packed sequences in row 0 (then batch is 1), or None
    (then nseq = batch). Returns y: [batch, seqlen, nheads, headdim] in x's dtype and
    final_states: [nseq, nheads, headdim, dstate] in fp32. The state is carried in fp32 throughout.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    if nheads % ngroups:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
    cu = _flat_cu_seqlens(batch, seqlen, cu_seqlens, x.device)
    nseq, ntokens = cu.numel() - 1, batch * seqlen
    if initial_states is not None:
        if initial_states.shape != (nseq, nheads, headdim, dstate):
            raise ValueError(f"initial_states must be {(nseq, nheads, headdim, dstate)}, "
                             f"got {tuple(initial_states.shape)}")
        initial_states = _inner_contiguous(initial_states.reshape(nseq, nheads, headdim * dstate))

    def flat(t: torch.Tensor, *shape: int) -> torch.Tensor:
        return _inner_contiguous(t.reshape(ntokens, *shape))

    y, final = _ssd_scan_fwd(flat(x, nheads, headdim), flat(dt, nheads), A.contiguous(),
                             flat(B, ngroups, dstate), flat(C, ngroups, dstate), D.contiguous(),
                             dt_bias.contiguous(), initial_states, cu, chunk_size, dt_limit)
    return y.view(batch, seqlen, nheads, headdim), final


def _discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    """softplus(dt + dt_bias) clamped to dt_limit, in fp32."""
    return F.softplus(dt.float() + dt_bias.float()).clamp(dt_limit[0], dt_limit[1])


def _owners(cu_seqlens: torch.Tensor, ntokens: int) -> torch.Tensor:
    """The sequence of each of ``ntokens`` packed tokens [ntokens]; the sequences must cover them all."""
    owner = torch.repeat_interleave(cu_seqlens.diff())
    if len(owner) != ntokens:
        raise ValueError(f"cu_seqlens end at token {len(owner)}, not at the end of the row ({ntokens})")
    return owner


class ChunkLayout(NamedTuple):
    """Packed sequences cut into chunks of ``chunk`` tokens that never hold two sequences (as the kernels cut
    them), laid out chunk index first: the first chunk of every sequence, then the second of every sequence
    that has one, and so on, longest sequence first within each. The sequences with a c-th chunk are then the
    first ``counts[c]`` rows of the state the scan hands from chunk to chunk. Positions past a sequence's end
    hold token 0, which the scan neutralises with a zero step."""

    source: torch.Tensor  # [nchunks * chunk] the token at each chunk position
    valid: torch.Tensor   # [nchunks, chunk] bool: a token, not padding
    target: torch.Tensor  # [ntokens] the chunk position of each token
    order: torch.Tensor   # [nseq] the sequence of each state row, longest first
    counts: list[int]     # [max chunks of a sequence] how many sequences have a c-th chunk

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, ntokens: int, chunk: int) -> ChunkLayout:
        """The layout of the sequences at int64 offsets ``cu_seqlens``, which must cover ``ntokens``."""
        device = cu_seqlens.device
        starts, lengths = cu_seqlens[:-1], cu_seqlens.diff()
        order = torch.argsort(lengths, descending=True, stable=True)
        rank = torch.empty_like(order).index_copy_(0, order, torch.arange(len(order), device=device))
        nchunks = (lengths[order] + chunk - 1) // chunk                         # per state row, non-increasing
        counts = (nchunks[None] > torch.arange(int(nchunks[0]), device=device)[:, None]).sum(1)
        first = F.pad(counts.cumsum(0), (1, 0))                                 # chunk index c starts here
        owner = _owners(cu_seqlens, ntokens)
        step = torch.arange(ntokens, device=device) - starts[owner]
        target = (first[step // chunk] + rank[owner]) * chunk + step % chunk
        total = int(first[-1]) * chunk
        source = torch.zeros(total, dtype=torch.int64, device=device).index_copy_(
            0, target, torch.arange(ntokens, device=device))
        valid = torch.zeros(total, dtype=torch.bool, device=device).index_fill_(0, target, True)
        return cls(source, valid.view(-1, chunk), target, order, counts.tolist())

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """[ntokens, H, ...] -> [nchunks, H, chunk, ...]: each head's chunk contiguous, so the chunk products
        are batched matmuls over (chunk, head) that read their operands in place."""
        nchunks, chunk = self.valid.shape
        heads = t.shape[1]
        rows = (self.source.view(nchunks, 1, chunk) * heads + torch.arange(heads, device=t.device)[:, None])
        return t.flatten(0, 1).index_select(0, rows.flatten()).view(nchunks, heads, chunk, *t.shape[2:])

    def unheads(self, t: torch.Tensor) -> torch.Tensor:
        """[nchunks, H, chunk, ...] -> [ntokens, H, ...], the inverse of ``heads`` on the tokens."""
        chunk, heads = self.valid.shape[1], t.shape[1]
        rows = (self.target // chunk * heads)[:, None] + torch.arange(heads, device=t.device)
        rows = rows * chunk + (self.target % chunk)[:, None]
        return t.flatten(0, 2).index_select(0, rows.flatten()).view(len(self.target), heads, *t.shape[3:])


def _pass_states(states: torch.Tensor, decay: torch.Tensor, state: torch.Tensor,
                 counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The serial hand-off: states [K, ...] what each chunk adds (``ChunkLayout`` order), decay [K, ...] the
    chunk's total decay (broadcast over the state's last two dims), state [S, ...] each row's initial state.
    Returns the state entering each chunk [K, ...] and each row's final state [S, ...]."""
    entering, finals = torch.empty_like(states), torch.empty_like(state)
    first = 0
    for n in counts:
        finals[n: len(state)] = state[n:]           # the rows whose sequences ended with the chunk before
        block = slice(first, first + n)
        entering[block] = state = state[:n]
        state = torch.addcmul(states[block], state, decay[block, ..., None, None])
        first += n
    finals[: len(state)] = state
    return entering, finals


#: the most elements of the intra-chunk decay matrices the reference holds at once
_DECAY_BUDGET = 1 << 24


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
    ngroups, dstate = B.shape[2:]
    ntokens, per_group = batch * seqlen, nheads // ngroups     # heads per group
    layout = ChunkLayout.of(_flat_cu_seqlens(batch, seqlen, cu_seqlens, x.device), ntokens, chunk_size)
    nchunks, chunk = layout.valid.shape
    # Every chunk at once, heads first: [chunks, groups, heads per group, chunk, ...].
    dt = _discretize_dt(dt, dt_bias, dt_limit).reshape(ntokens, nheads)
    dt = (layout.heads(dt[..., None])[..., 0] * layout.valid[:, None]).view(nchunks, ngroups, per_group, chunk)
    xdt = layout.heads(x.float().reshape(ntokens, nheads, headdim)).view(*dt.shape, headdim) * dt[..., None]
    B, C = (layout.heads(t.float().reshape(ntokens, ngroups, dstate))[:, :, None] for t in (B, C))  # [K, G, 1, q, N]
    cum = (dt * A.float().view(ngroups, per_group, 1)).cumsum(-1)             # the running log-decay, <= 0
    # What each chunk adds to the state, then the serial hand-off from chunk to chunk.
    to_end = (cum[..., -1:] - cum).clamp_(max=0.0).exp_()
    states = xdt.transpose(-1, -2) @ (B * to_end[..., None])                  # [K, G, R, P, N]
    state = (initial_states.float().index_select(0, layout.order) if initial_states is not None  # in row order
             else x.new_zeros(len(layout.order), nheads, headdim, dstate, dtype=torch.float32))
    entering, finals = _pass_states(states, cum[..., -1].exp(), state.view(-1, ngroups, per_group, headdim, dstate),
                                    layout.counts)
    # The outputs: from the state entering the chunk, plus the chunk's own tokens (the masked quadratic form,
    # exp(cum_t - cum_s) C_t.B_s for s <= t, the exponent clamped at 0 so rounding cannot overflow it). The
    # mask zeroes C.B (per group) rather than sending the decay (per head) to exp(-inf): on CPU, exp takes a
    # slow path on -inf, several times the cost of a finite exponent.
    y = (C * cum.exp()[..., None]) @ entering.transpose(-1, -2)               # [K, G, R, q, P]
    rows = max(1, _DECAY_BUDGET // (nheads * chunk * chunk))
    for k in range(0, nchunks, rows):
        part = slice(k, k + rows)
        decay = (cum[part, ..., :, None] - cum[part, ..., None, :]).clamp_(max=0.0).exp_()
        decay = decay.mul_((C[part] @ B[part].transpose(-1, -2)).tril_())
        y[part].view(-1, chunk, headdim).baddbmm_(decay.view(-1, chunk, chunk), xdt[part].view(-1, chunk, headdim))
    y = torch.addcmul(layout.unheads(y.flatten(1, 2)), D.float()[:, None], x.float().reshape(ntokens, nheads, headdim))
    finals = torch.empty_like(finals).index_copy_(0, layout.order, finals)    # in sequence order
    return y.view(x.shape).to(x.dtype), finals.flatten(1, 2)
