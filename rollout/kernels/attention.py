"""Decode attention: one query token per sequence against its KV cache, each row reading up to its own position.

The mask is each row's position, read on the device, so a step's launch has the same shapes at every step of
a generation, whatever the length of the context: the whole decode step, attention layers included, replays
as one CUDA graph (``rollout.graphs``). The kernel is split-K ("flash decoding"): each (row, KV head) is cut
into ``splits`` parts of its own length, each part a program that keeps the scores and the softmax of its
group of query heads in registers (an online softmax over blocks of positions), and a second kernel merges
the parts. The split count is fixed per batch size and cache length, enough programs to fill the GPU at
small batch; parts past a short row's length end at once.

Products take bf16/fp16 operands in their own dtype on a GPU (fp32 accumulation), fp32 operands elsewhere
(Triton's interpreter multiplies bf16 operands as raw bits).

The step's own key and value are written into the cache first, by a small kernel of their own, so that no
part reads a position another part writes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rollout.kernels.ssd_scan import _LOW_PRECISION, _dot_precision, _inner_contiguous


@triton.jit
def _write_kv_kernel(
    # Pointers
    k_ptr, v_ptr, keys_ptr, values_ptr, pos_ptr,
    # Dimensions
    head_dim,
    # Strides
    stride_k_b, stride_k_h, stride_v_b, stride_v_h, stride_K_b, stride_K_h, stride_K_n, stride_K_d,
    stride_V_b, stride_V_h, stride_V_n, stride_V_d,
    # Meta-parameters
    BLOCK_D: tl.constexpr,
):
    """Row b's key and value of KV head h into its cache at its position."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    pos = tl.load(pos_ptr + b).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < head_dim
    k = tl.load(k_ptr + b * stride_k_b + h * stride_k_h + offs_d, mask=mask)
    v = tl.load(v_ptr + b * stride_v_b + h * stride_v_h + offs_d, mask=mask)
    tl.store(keys_ptr + b * stride_K_b + h * stride_K_h + pos * stride_K_n + offs_d * stride_K_d,
             k.to(keys_ptr.dtype.element_ty), mask=mask)
    tl.store(values_ptr + b * stride_V_b + h * stride_V_h + pos * stride_V_n + offs_d * stride_V_d,
             v.to(values_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_attention_kernel(
    # Pointers
    q_ptr, keys_ptr, values_ptr, pos_ptr, out_ptr, part_ptr, stats_ptr,
    # Dimensions
    scale, group, head_dim,
    # Strides
    stride_q_b, stride_q_h, stride_K_b, stride_K_h, stride_K_n, stride_K_d, stride_V_b, stride_V_h, stride_V_n,
    stride_V_d, stride_o_b, stride_o_h,
    # Meta-parameters
    SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Part ``s`` of the positions [0, pos] of row b, for the query heads of KV head h: with one part, the
    normalized output; with more, the unnormalized sum of values with its running max and softmax sum,
    which ``_merge_kernel`` combines. Parts are whole blocks of positions; a part past the row's length
    stores max -inf and sum 0."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    length = tl.load(pos_ptr + b).to(tl.int32) + 1
    per = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
    start = s * per
    end = tl.minimum(start + per, length)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < group
    mask_d = offs_d < head_dim
    heads = h * group + offs_g
    q = tl.load(q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
    keys = keys_ptr + b * stride_K_b + h * stride_K_h
    values = values_ptr + b * stride_V_b + h * stride_V_h
    top = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for first in range(start, end, BLOCK_N):
        offs_n = first + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        k = tl.load(keys + offs_n[None, :] * stride_K_n + offs_d[:, None] * stride_K_d,
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)   # [BLOCK_D, BLOCK_N]
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        rescale = tl.exp(top - new_top)
        p = tl.exp(scores - new_top[:, None])
        total = total * rescale + tl.sum(p, axis=1)
        v = tl.load(values + offs_n[:, None] * stride_V_n + offs_d[None, :] * stride_V_d,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)   # [BLOCK_N, BLOCK_D]
        acc = acc * rescale[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        top = new_top
    mask = mask_g[:, None] & mask_d[None, :]
    if SPLITS == 1:
        out = acc / total[:, None]
        tl.store(out_ptr + b * stride_o_b + heads[:, None] * stride_o_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        part = (b * tl.num_programs(1) * group + heads) * SPLITS + s                     # [BLOCK_G]
        tl.store(part_ptr + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mask)
        tl.store(stats_ptr + part * 2, top, mask=mask_g)
        tl.store(stats_ptr + part * 2 + 1, total, mask=mask_g)


@triton.jit
def _merge_kernel(
    # Pointers
    part_ptr, stats_ptr, out_ptr,
    # Dimensions
    heads, head_dim,
    # Strides
    stride_o_b, stride_o_h,
    # Meta-parameters
    SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Query head j of row b from its parts: each part's sum rescaled to the largest of their maxima."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    part = (b * heads + j) * SPLITS + tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    top = tl.load(stats_ptr + part * 2)
    weight = tl.exp(top - tl.max(top, axis=0))      # 0 for an empty part (max -inf)
    total = tl.sum(tl.load(stats_ptr + part * 2 + 1) * weight, axis=0)
    acc = tl.load(part_ptr + part[:, None] * BLOCK_D + offs_d[None, :])
    out = tl.sum(acc * weight[:, None], axis=0) / total
    tl.store(out_ptr + b * stride_o_b + j * stride_o_h + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < head_dim)


@dataclass(frozen=True)
class AttentionLaunch:
    """The decode attention's launch; ``decode_attention`` reads the module's ``ATTENTION_LAUNCH``. ``splits``
    None: enough parts per (row, KV head) for two programs per multiprocessor, at most one per block of the
    cache's positions (one on CPU)."""

    splits: int | None = None
    block_n: int = 64       # positions per block
    # At head dim 128 in bf16 for sm_90, 4 warps spill (255 registers and a stack); 8 take 160 registers.
    num_warps: int = 8


ATTENTION_LAUNCH = AttentionLaunch()


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(heads: int, max_length: int, multiprocessors: int, block_n: int) -> int:
    """Parts per (row, KV head), for ``heads`` (row, KV head) pairs: a power of two, fixed by the shapes alone
    (a CUDA graph replays one launch). Enough for two programs per multiprocessor, at most 64, and no more
    than the cache's blocks of ``block_n`` positions."""
    want = triton.next_power_of_2(triton.cdiv(2 * multiprocessors, heads))
    return max(1, min(want, 64, 1 << (triton.cdiv(max_length, block_n).bit_length() - 1)))


def _decode_attention_fwd(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                          scale: float, out: torch.Tensor) -> None:
    """Launches the parts and, with more than one, their merge, with ``ATTENTION_LAUNCH``."""
    batch, heads, head_dim = q.shape
    kv_heads, max_length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    launch = ATTENTION_LAUNCH
    splits = launch.splits or (split_count(batch * kv_heads, max_length, _multiprocessors(q.device), launch.block_n)
                               if q.is_cuda else 1)
    block_d = max(16, triton.next_power_of_2(head_dim))     # tl.dot's smallest operand is 16 wide
    part = stats = out  # placeholders when there is one part
    if splits > 1:
        part = torch.empty(batch * heads * splits, block_d, dtype=torch.float32, device=q.device)
        stats = torch.empty(batch * heads * splits, 2, dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(batch, kv_heads, splits)](
        q, keys, values, positions, out, part, stats,
        scale, group, head_dim,
        q.stride(0), q.stride(1), *keys.stride(), *values.stride(), out.stride(0), out.stride(1),
        SPLITS=splits, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=launch.block_n, BLOCK_D=block_d,
        DOT_DTYPE=_LOW_PRECISION[q.dtype] if q.is_cuda and q.dtype in _LOW_PRECISION else tl.float32,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=launch.num_warps)
    if splits > 1:
        _merge_kernel[(batch, heads)](part, stats, out, heads, head_dim, out.stride(0), out.stride(1),
                                      SPLITS=splits, BLOCK_D=block_d)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                     scale: float, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its cached keys and values, the step's own written
    first; Triton.

    q: [batch, heads, head_dim], query head j reading KV head j // (heads // kv_heads); keys, values: the
    cache, [slots, kv_heads, length, head_dim] (any strides), of which row b (b < batch) is read at positions
    [0, positions[b]]; positions: [batch] int64; k, v: [batch, kv_heads, head_dim] or None, written into the
    cache in place at ``positions`` of rows [:batch]. Returns [batch, heads, head_dim] in q's dtype.
    """
    positions = positions.contiguous()
    if k is not None:
        batch, kv_heads, head_dim = k.shape
        k, v = _inner_contiguous(k), _inner_contiguous(v)
        _write_kv_kernel[(batch, kv_heads)](
            k, v, keys, values, positions, head_dim,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), *keys.stride(), *values.stride(),
            BLOCK_D=triton.next_power_of_2(head_dim))
    q = _inner_contiguous(q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _decode_attention_fwd(q, keys, values, positions, scale, out)
    return out


def decode_attention_ref(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                         scale: float, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its cached keys and values, the step's own written
    first; PyTorch reference.

    q: [batch, heads, head_dim], query head j reading KV head j // (heads // kv_heads); keys, values: the
    cache, [slots, kv_heads, length, head_dim] (any strides), of which row b (b < batch) is read at positions
    [0, positions[b]]; positions: [batch] int64; k, v: [batch, kv_heads, head_dim] or None, written into the
    cache in place at ``positions`` of rows [:batch]. Returns [batch, heads, head_dim] in q's dtype.

    The products run over the whole cache length, masked past each row's position: no length is read back
    to the host, at the cost of the positions no row has reached yet.
    """
    batch = q.shape[0]
    if k is not None:       # through the whole cache: a compiled step writes into it in place
        rows = torch.arange(batch, device=q.device)
        keys[rows, :, positions] = k
        values[rows, :, positions] = v
    keys, values = keys[:batch], values[:batch]
    kv_heads, length = keys.shape[1], keys.shape[2]
    grouped = q.reshape(batch, kv_heads, -1, q.shape[-1])
    scores = (grouped @ keys.transpose(-1, -2)) * scale
    masked = torch.arange(length, device=q.device) > positions[:, None]                 # [batch, length]
    probs = scores.masked_fill(masked[:, None, None], float("-inf")).softmax(-1)
    return (probs @ values).reshape(q.shape)
