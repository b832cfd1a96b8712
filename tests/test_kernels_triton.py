"""The Triton kernels against their PyTorch references, run on CPU by Triton's interpreter.

TRITON_INTERPRET must be set before Triton is first imported, and other test modules import Triton (through
transformers and deepspeed) without it. So the checks run in one fresh subprocess that has it set,
``python -m tests.test_kernels_triton CASE ...``, which prints every case's outcome as JSON; each test reads
its case from that one run, so the interpreter and the imports are paid for once.

The interpreter runs plain Python and accepts code the compiler rejects, so a slow test also compiles every
kernel to a cubin for sm_90, which needs no GPU (ptxas ships with Triton).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from functools import partial
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy
import pytest
import torch
import triton
from packaging.version import Version

from bench.common import bench_tokenizer, chat_prompts
from model.factory import build_model
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNorm, NemotronHRMSNormGated
from rollout import kernels
from rollout.kernels import (causal_conv1d_ref, causal_conv1d_triton, causal_conv1d_update_ref,
                             causal_conv1d_update_triton, decode_attention_ref, decode_attention_triton,
                             gated_rms_norm_ref, gated_rms_norm_triton, rms_norm_ref, rms_norm_triton,
                             selective_state_update_ref, selective_state_update_triton, ssd_scan_ref, ssd_scan_triton)
from rollout.engine import RolloutEngine
from rollout.kernels.attention import (ATTENTION_LAUNCH, AttentionLaunch, _decode_attention_kernel, _merge_kernel,
                                       _write_kv_kernel, split_count)
from rollout.kernels.conv1d import _conv1d_kernel, _conv1d_update_kernel
from rollout.kernels.rms_norm import _rms_norm_kernel
from rollout.kernels.ssd_scan import (LAUNCH, ScanLaunch, _chunk_cb_kernel, _chunk_cumsum_kernel, _chunk_scan_kernel,
                                      _chunk_cumsum, _chunk_state_kernel, _chunk_table, _chunk_table_kernel,
                                      _state_passing_kernel)
from rollout.kernels.state_update import _state_update_kernel
from rollout.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
H = 4
LIMIT = (0.001, float("inf"))
F32, BF16 = torch.float32, torch.bfloat16


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """1e-4 in fp32; a bf16 output may differ by the one bf16 rounding both sides make (< 1% relative)."""
    tol = 1e-4 if got.dtype == F32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def layout(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """t, or its values in a view with padded rows, as the engine passes slices of one projection."""
    if not strided:
        return t
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
    wide[..., : t.shape[-1]] = t
    return wide[..., : t.shape[-1]]


def check_ssd_scan(T: int, chunk: int, *, batch: int = 1, G: int = 2, P: int = 8, N: int = 6,
                   cu: tuple[int, ...] | None = None, dtype: torch.dtype = F32, decay: float = 0.0,
                   strided: bool = False, launch: ScanLaunch = ScanLaunch()) -> None:
    """y and every sequence's final state, from random initial states; ``decay`` pushes dt up and A down.
    ``launch``: the kernels' launch settings (every variant ``bench_kernels --tune`` times must be right)."""
    g = torch.Generator().manual_seed(T * chunk)
    nseq = batch if cu is None else len(cu) - 1
    a = dict(x=randn(g, batch, T, H, P, dtype=dtype), dt=randn(g, batch, T, H) + decay,
             A=-torch.rand(H, generator=g) * 2 - decay, B=randn(g, batch, T, G, N, dtype=dtype),
             C=randn(g, batch, T, G, N, dtype=dtype), D=randn(g, H), dt_bias=randn(g, H) * 0.5)
    a = {k: layout(v, strided and v.dim() > 1) for k, v in a.items()}
    kw = dict(chunk_size=chunk, dt_limit=LIMIT, initial_states=randn(g, nseq, H, P, N),
              cu_seqlens=None if cu is None else torch.tensor(cu))
    with mock.patch.object(importlib.import_module("rollout.kernels.ssd_scan"), "LAUNCH", launch):
        y, final = ssd_scan_triton(**a, **kw)
    want_y, want_final = ssd_scan_ref(**a, **kw)
    assert_close(y, want_y)
    assert_close(final, want_final)


def slot_rows(slots: tuple[int, ...] | None) -> tuple[int, torch.Tensor | None, list[int]]:
    """(batch, slot_idx, the slots it writes); ``slots`` None: no slot_idx, rows 0..2 are slots 0..2."""
    return (3, None, [0, 1, 2]) if slots is None else (len(slots), torch.tensor(slots), list(slots))


def check_state_update(*, slots: tuple[int, ...] | None = (4, -1, 0, 2), nslots: int = 6, G: int = 2, P: int = 8,
                       N: int = 6, dtype: torch.dtype = F32, strided: bool = False) -> None:
    """y, and the whole state buffer: the named slots updated, every other slot untouched, padding rows zero."""
    batch, slot_idx, written = slot_rows(slots)
    g = torch.Generator().manual_seed(batch + P)
    state = randn(g, nslots, H, P, N)
    args = (randn(g, batch, H, P, dtype=dtype), randn(g, batch, H), -torch.rand(H, generator=g) * 2,
            randn(g, batch, G, N, dtype=dtype), randn(g, batch, G, N, dtype=dtype), randn(g, H), randn(g, H) * 0.5)
    args = tuple(layout(t, strided and t.dim() > 1) for t in args)
    got, want = state.clone(), state.clone()
    y = selective_state_update_triton(got, *args, slot_idx=slot_idx, dt_limit=LIMIT)
    assert_close(y, selective_state_update_ref(want, *args, slot_idx=slot_idx, dt_limit=LIMIT))
    assert_close(got, want)
    untouched = [s for s in range(nslots) if s not in written]
    assert torch.equal(got[untouched], state[untouched]) and (slot_idx is None or not y[slot_idx < 0].any())


def check_conv1d(*, batch: int = 1, T: int = 12, cu: tuple[int, ...] | None = (0, 2, 12), dim: int = 10,
                 width: int = 4, bias: bool = True, silu: bool = True, strided: bool = False) -> None:
    """out and every sequence's conv state, including sequences shorter than width - 1."""
    g = torch.Generator().manual_seed(T + dim)
    x, weight = layout(randn(g, batch, T, dim), strided), randn(g, dim, width)
    args = (x, weight, randn(g, dim) if bias else None)
    kw = dict(cu_seqlens=None if cu is None else torch.tensor(cu), silu=silu)
    (out, states), (want_out, want_states) = causal_conv1d_triton(*args, **kw), causal_conv1d_ref(*args, **kw)
    assert_close(out, want_out)
    assert_close(states, want_states)


def check_conv1d_update(*, slots: tuple[int, ...] | None = (3, -1, 0), nslots: int = 5, dim: int = 10,
                        width: int = 4, bias: bool = True, silu: bool = True, strided: bool = False,
                        tap_major: bool = False) -> None:
    """out and the whole conv-state buffer (other slots untouched, padding rows zero). ``tap_major``: the
    state and weight are transposed views of [nslots, width - 1, dim] and [width, dim], as the engine's."""
    batch, slot_idx, written = slot_rows(slots)
    g = torch.Generator().manual_seed(batch + dim)
    if tap_major:
        conv_state, weight = randn(g, nslots, width - 1, dim).transpose(1, 2), randn(g, width, dim).t()
    else:
        conv_state, weight = randn(g, nslots, dim, width - 1), randn(g, dim, width)
    args = (layout(randn(g, batch, dim), strided), weight, randn(g, dim) if bias else None)
    got, want = conv_state.clone(), conv_state.clone()
    out = causal_conv1d_update_triton(args[0], got, *args[1:], slot_idx=slot_idx, silu=silu)
    assert_close(out, causal_conv1d_update_ref(args[0], want, *args[1:], slot_idx=slot_idx, silu=silu))
    untouched = [s for s in range(nslots) if s not in written]
    assert torch.equal(got, want) and torch.equal(got[untouched], conv_state[untouched])
    assert slot_idx is None or not out[slot_idx < 0].any()


def check_norm(gated: bool, dtype: torch.dtype) -> None:
    """The reference equals transformers' module bit for bit, so a release that rounds elsewhere fails here;
    the Triton norm equals it to fp32 precision. In bf16 the interpreter truncates where a GPU rounds to
    nearest, so the two casts of the gated norm may each lose a step; ``test_kernels_cuda.py`` holds the
    compiled kernel to the module's bits."""
    g = torch.Generator().manual_seed(int(gated))
    width, group = 96, 24
    module = NemotronHRMSNormGated(width, group, eps=1e-5) if gated else NemotronHRMSNorm(width, eps=1e-5)
    module = module.to(dtype)
    with torch.no_grad():
        module.weight.copy_(randn(g, width) + 1)
    x, gate = (layout(randn(g, 2, 7, width, dtype=dtype) * 3, strided=True) for _ in range(2))
    if gated:
        got = gated_rms_norm_triton(x, gate, module.weight, eps=1e-5, group_size=group)
        ref, want = gated_rms_norm_ref(x, gate, module.weight, eps=1e-5, group_size=group), module(x, gate)
    else:
        got, ref = rms_norm_triton(x, module.weight, eps=1e-5), rms_norm_ref(x, module.weight, eps=1e-5)
        want = module(x)
    assert torch.equal(ref, want) and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == F32 else 2 ** -6, atol=1e-6)


def check_engine() -> None:
    """The engine's own calls into the kernels, as on a GPU: packed prefill of two prompts, decode steps on
    slots as rows, and a finished sequence's slot taken by the third prompt. Greedy decoding with every op
    on its Triton kernel gives the tokens and log-probabilities (within 1e-4) decoding with the references
    gives."""
    tokenizer = bench_tokenizer()
    model = build_model("tiny", tokenizer, seed=0).eval()
    prompts = [p[-n:] for p, n in zip(chat_prompts(tokenizer, 3), (30, 9, 17))]
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=())
    want = RolloutEngine(model, tokenizer, max_batch=2, max_length=64).generate(prompts, params)
    ops = ("ssd_scan", "selective_state_update", "causal_conv1d", "causal_conv1d_update", "decode_attention")
    with mock.patch.multiple(kernels, **{op: getattr(kernels, f"{op}_triton") for op in ops}):
        got = RolloutEngine(model, tokenizer, max_batch=2, max_length=64).generate(prompts, params)
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=0)


def check_decode_attention(*, kv_heads: int = 2, group: int = 2, head_dim: int = 24, splits: int = 1,
                           dtype: torch.dtype = F32, write: bool = True, position_major: bool = False) -> None:
    """The output and both caches, for rows at the first position, inside the first block, on a block edge and at
    the cache's last position; ``splits`` parts per row over blocks of 16 positions (some parts empty), merged.
    ``position_major``: keys as the engine stores them on CPU (a transposed view of [slots, kv, dim, length])."""
    g = torch.Generator().manual_seed(head_dim + splits)
    batch, slots, length = 4, 6, 70
    if position_major:
        keys = randn(g, slots, kv_heads, head_dim, length, dtype=dtype).transpose(2, 3)
    else:
        keys = randn(g, slots, kv_heads, length, head_dim, dtype=dtype)
    values = randn(g, slots, kv_heads, length, head_dim, dtype=dtype)
    q = layout(randn(g, batch, kv_heads * group, head_dim, dtype=dtype), strided=True)
    positions = torch.tensor([0, 9, 31, length - 1])
    new = dict(k=randn(g, batch, kv_heads, head_dim, dtype=dtype), v=randn(g, batch, kv_heads, head_dim, dtype=dtype))
    new = new if write else {}
    got, want = [t.clone() for t in (keys, values)], [t.clone() for t in (keys, values)]
    attention = importlib.import_module("rollout.kernels.attention")
    with mock.patch.object(attention, "ATTENTION_LAUNCH", AttentionLaunch(splits=splits, block_n=16)):
        out = decode_attention_triton(q, *got, positions, head_dim ** -0.5, **new)
    assert_close(out, decode_attention_ref(q, *want, positions, head_dim ** -0.5, **new))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def check_chunk_table(lengths: tuple[int, ...], chunk: int) -> None:
    """The chunk table, as its own kernel writes it and as the chunk cumsum does (first tokens, lengths and
    chunk offsets), against the same cut made in plain Python: empty sequences own no chunk, the rows past
    the real chunks have length 0."""
    cu = torch.tensor([0, *lengths]).cumsum(0)
    want = [(int(cu[s]) + j, min(chunk, n - j), s) for s, n in enumerate(lengths) for j in range(0, n, chunk)]
    rows = len(want)
    start, length, seq = _chunk_table(cu, int(cu[-1]), chunk)
    assert start.numel() >= rows and not length[rows:].any()
    assert list(zip(start[:rows].tolist(), length[:rows].tolist(), seq[:rows].tolist())) == want
    chunks = _chunk_cumsum(torch.zeros(int(cu[-1]), 1), -torch.ones(1), torch.zeros(1), cu, chunk, LIMIT)
    assert torch.equal(chunks.start[:rows], start[:rows]) and torch.equal(chunks.length, length)
    assert chunks.cu_chunks.tolist() == [0, *numpy.cumsum([-(-n // chunk) for n in lengths]).tolist()]


def check_state_passing_apart(dtype: torch.dtype) -> None:
    """The entering states written to a buffer of their own (``low_precision`` on a GPU, bf16 there) equal the
    ones written in place, rounded once to that buffer's dtype; the final states are the same."""
    g = torch.Generator().manual_seed(3)
    size, cu_chunks = 40, torch.tensor([0, 3, 5])     # two sequences of 3 and 2 chunks, 2 heads
    states, init = randn(g, 5, 2, size), randn(g, 2, 2, size)
    dA_cs = -torch.rand(5, 2, 4, generator=g).cumsum(-1)

    def run(entering: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        added, final = states.clone(), torch.empty_like(init)
        entering = added if entering is None else entering
        _state_passing_kernel[(2, 2, 2)](added, dA_cs, cu_chunks, init, entering, final, size,
                                         added.stride(0), added.stride(1), dA_cs.stride(1), dA_cs.stride(0),
                                         init.stride(0), init.stride(1), entering.stride(0), entering.stride(1),
                                         final.stride(0), final.stride(1), CHUNK=4, HAS_INIT=True, BLOCK=32)
        return entering, final

    in_place, final = run(None)
    apart, final_apart = run(torch.empty(5, 2, size, dtype=dtype))
    assert not torch.equal(in_place, states)
    # Triton's interpreter may round to bf16 otherwise than PyTorch does: one bf16 step (2^-7 relative) apart.
    torch.testing.assert_close(apart.float(), in_place, atol=0, rtol=0 if dtype == F32 else 2 ** -7)
    torch.testing.assert_close(final_apart, final, atol=0, rtol=0)


CASES: dict[str, Callable[[], None]] = {
    "ssd_scan/T37-chunk8-batch2": partial(check_ssd_scan, 37, 8, batch=2),
    "ssd_scan/T13-chunk4-ngroups1": partial(check_ssd_scan, 13, 4, batch=2, G=1),
    "ssd_scan/T16-chunk16": partial(check_ssd_scan, 16, 16),
    "ssd_scan/T29-chunk12-not-a-power-of-2": partial(check_ssd_scan, 29, 12),
    # two row blocks, several k steps, headdim 80 (Nemotron Nano 2) in two masked blocks
    "ssd_scan/T150-chunk128-headdim80-ngroups1": partial(check_ssd_scan, 150, 128, G=1, P=80, N=16),
    "ssd_scan/packed-chunk8": partial(check_ssd_scan, 40, 8, cu=(0, 5, 16, 19, 40)),
    "ssd_scan/packed-chunk16-ngroups1-strided": partial(check_ssd_scan, 53, 16, G=1, cu=(0, 16, 50, 53),
                                                        strided=True),
    "ssd_scan/bf16": partial(check_ssd_scan, 37, 16, batch=2, dtype=BF16),
    "ssd_scan/strong-decay": partial(check_ssd_scan, 64, 32, decay=30.0),
    # C·Bᵀ from its own kernel: chunks of 12 (columns masked), 128 (two row blocks), packed and strided, bf16
    "ssd_scan/precompute-cb-chunk12": partial(check_ssd_scan, 29, 12, launch=ScanLaunch(precompute_cb=True)),
    "ssd_scan/precompute-cb-T150-chunk128-headdim80": partial(check_ssd_scan, 150, 128, G=1, P=80, N=16,
                                                              launch=ScanLaunch(precompute_cb=True)),
    "ssd_scan/precompute-cb-packed-strided": partial(check_ssd_scan, 53, 16, cu=(0, 16, 50, 53), strided=True,
                                                     launch=ScanLaunch(precompute_cb=True)),
    "ssd_scan/precompute-cb-bf16": partial(check_ssd_scan, 37, 16, batch=2, dtype=BF16,
                                           launch=ScanLaunch(precompute_cb=True)),
    "ssd_scan/other-blocks": partial(check_ssd_scan, 150, 128, G=1, P=80, N=16,
                                     launch=ScanLaunch(state_block_k=64, state_block_n=128, scan_block_k=64,
                                                       passing_block=256, scan_block_m=32)),
    "ssd_scan/precompute-cb-scan-block-m128": partial(check_ssd_scan, 150, 128, G=1, P=80, N=16,
                                                      launch=ScanLaunch(scan_block_m=128, precompute_cb=True)),
    "state_update/ngroups2-padding": partial(check_state_update),
    "state_update/ngroups1-headdim20-dstate32-strided": partial(check_state_update, slots=(1, 5, -1), G=1, P=20,
                                                                N=32, strided=True),
    "state_update/bf16": partial(check_state_update, dtype=BF16),
    "state_update/rows-are-slots": partial(check_state_update, slots=None),
    **{f"norm/{'gated' if gated else 'block'}-{str(dtype)[6:]}": partial(check_norm, gated, dtype)
       for gated in (False, True) for dtype in (F32, BF16)},
    "chunk_table/one-sequence": partial(check_chunk_table, (300,), 128),
    # 150 sequences (three blocks of 64) of 0 to 40 tokens, over 200 rows (two blocks of 128 in the table kernel)
    "chunk_table/many-with-empty": partial(check_chunk_table,
                                           tuple(int(n) for n in torch.randint(0, 41, (150,),
                                                 generator=torch.Generator().manual_seed(5))), 16),
    "state_passing/entering-apart-fp32": partial(check_state_passing_apart, F32),
    "state_passing/entering-apart-bf16": partial(check_state_passing_apart, BF16),
    "conv1d/packed-short-sequence": partial(check_conv1d),
    # a sequence whose last 64-token block holds 1 token, 70 channels in two blocks
    "conv1d/packed-across-blocks-strided": partial(check_conv1d, T=100, cu=(0, 2, 67, 100), dim=70, strided=True),
    "conv1d/batch2-no-bias-no-silu": partial(check_conv1d, batch=2, T=9, cu=None, bias=False, silu=False),
    "conv1d_update/padding-strided": partial(check_conv1d_update, strided=True),
    "conv1d_update/no-bias-no-silu-width3": partial(check_conv1d_update, slots=(0, 4), width=3, bias=False, silu=False),
    "conv1d_update/rows-are-slots": partial(check_conv1d_update, slots=None),
    "conv1d_update/tap-major": partial(check_conv1d_update, tap_major=True),
    "conv1d_update/tap-major-rows-are-slots": partial(check_conv1d_update, slots=None, tap_major=True),
    "decode_attention/tiny": partial(check_decode_attention),
    "decode_attention/four-parts-position-major": partial(check_decode_attention, splits=4, position_major=True),
    # Nemotron Nano 2's group of 5 query heads, head dim 128, no write; bf16 in eight parts
    "decode_attention/group5-headdim128-no-write": partial(check_decode_attention, kv_heads=1, group=5, head_dim=128,
                                                           splits=2, write=False),
    "decode_attention/bf16-eight-parts": partial(check_decode_attention, kv_heads=2, group=4, head_dim=64, splits=8,
                                                 dtype=BF16),
    "engine/tiny-greedy": check_engine,
}


def compile_sm90(kernel: Callable, io_ptrs: tuple[str, ...], constexprs: dict,
                 options: dict | None = None) -> dict[str, str | bytes]:
    """``kernel`` through Triton's whole compiler for an H100, at the launchers' block sizes; returns its code
    at each level (``ptx``, ``cubin``, ...). ``io_ptrs`` point to bf16 activations, the other pointers to fp32
    (int64 for indices and offsets)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name.startswith(("chunk_", "cu_", "slot_", "pos_")):
            return "*i64"
        if name.endswith("_ptr"):
            return "*bf16" if name in io_ptrs else "*fp32"
        return "fp32" if name in ("dt_min", "dt_max", "eps", "scale") else "i32"

    signature = {name: arg_type(name) for name in kernel.arg_names}
    src = ASTSource(kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    asm = compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm
    assert asm["cubin"]
    return asm


def check_no_spills(names: tuple[str, ...]) -> None:
    """The named kernels keep their values in registers on sm_90 (cuobjdump's resource usage: no stack, no
    local memory): a spill would go through memory on every step of their loops."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(SM90[name]()["cubin"])
            cubin.flush()
            usage = subprocess.run([str(tool), "-res-usage", cubin.name], capture_output=True, text=True,
                                   check=True).stdout
        assert "STACK:0 " in usage and "LOCAL:0 " in usage, f"{name} spills: {usage}"


def check_dependent_launch() -> None:
    """The decode step under a programmatic dependent launch (``StepLaunch.pdl``), in its PTX: rows in the first
    slots (the engine's way), it loads its state before it waits on the kernel before it; with a slot index,
    which that kernel may have written, it loads nothing before. Either way it lets the next kernel start only
    after its last load, so that kernel can write any input of this one once it has waited."""
    for has_slots in (False, True):
        ptx = compile_sm90(_state_update_kernel, (*ACTIVATIONS, "dt_ptr"),
                           dict(HAS_SLOTS=has_slots, PDL=True, BLOCK_P=32, BLOCK_N=128),
                           dict(num_warps=4, launch_pdl=True))["ptx"]
        wait, launch = ptx.index("griddepcontrol.wait"), ptx.index("griddepcontrol.launch_dependents")
        before = ptx[:wait].count("ld.global")
        assert (before > 0) != has_slots, f"slot index {has_slots}: {before} loads before the wait"
        assert wait < launch and "ld.global" not in ptx[launch:], ptx[launch:]


ACTIVATIONS = ("x_ptr", "B_ptr", "C_ptr", "y_ptr", "out_ptr")
STATE_DOTS = dict(num_warps=LAUNCH.state_warps, num_stages=LAUNCH.state_stages)
SCAN_DOTS = dict(num_warps=LAUNCH.scan_warps, num_stages=LAUNCH.scan_stages)
DOT_DTYPES = (triton.language.float32, triton.language.bfloat16)   # fp32 operands, and low_precision's
SM90: dict[str, Callable[[], object]] = {
    "sm90/chunk_table": partial(compile_sm90, _chunk_table_kernel, (), dict(CHUNK=64, BLOCK_R=128, BLOCK_S=64)),
    "sm90/chunk_cumsum": partial(compile_sm90, _chunk_cumsum_kernel, ("dt_ptr",),
                                 dict(CHUNK=128, BLOCK_H=16, BLOCK_Q=128, BLOCK_S=64)),
    **{f"sm90/chunk_state-{dtype}": partial(compile_sm90, _chunk_state_kernel, ACTIVATIONS,
                                            dict(CHUNK=128, BLOCK_P=64, BLOCK_N=64, BLOCK_K=LAUNCH.state_block_k,
                                                 DOT_DTYPE=dtype, DOT_PRECISION="tf32"), STATE_DOTS)
       for dtype in DOT_DTYPES},
    **{f"sm90/state_passing-{name}": partial(compile_sm90, _state_passing_kernel, entering,
                                             dict(CHUNK=128, HAS_INIT=True, BLOCK=LAUNCH.passing_block),
                                             dict(num_warps=LAUNCH.passing_warps))
       for name, entering in (("fp32", ()), ("bf16-entering", ("entering_ptr",)))},    # low_precision's
    **{f"sm90/chunk_scan-{dtype}-precomputed-cb-{cb}": partial(
        compile_sm90, _chunk_scan_kernel, ACTIVATIONS,
        dict(BLOCK_M=64, BLOCK_P=64, BLOCK_K=LAUNCH.scan_block_k, BLOCK_DSTATE=128, PRECOMPUTED_CB=cb,
             DOT_DTYPE=dtype, DOT_PRECISION="tf32"), SCAN_DOTS)
       for dtype in DOT_DTYPES for cb in (False, True)},
    **{f"sm90/chunk_cb-{dtype}": partial(compile_sm90, _chunk_cb_kernel, ACTIVATIONS,
                                         dict(CHUNK=128, BLOCK_M=64, BLOCK_Q=128, BLOCK_DSTATE=128, DOT_DTYPE=dtype,
                                              DOT_PRECISION="tf32"), SCAN_DOTS)
       for dtype in DOT_DTYPES},
    "sm90/state_update": partial(compile_sm90, _state_update_kernel, (*ACTIVATIONS, "dt_ptr"),
                                 dict(HAS_SLOTS=True, PDL=False, BLOCK_P=32, BLOCK_N=128), dict(num_warps=4)),
    "sm90/state_update-rows-are-slots": partial(compile_sm90, _state_update_kernel, (*ACTIVATIONS, "dt_ptr"),
                                                dict(HAS_SLOTS=False, PDL=False, BLOCK_P=32, BLOCK_N=128),
                                                dict(num_warps=4)),
    "sm90/state_update-dependent-launch": check_dependent_launch,
    "sm90/conv1d": partial(compile_sm90, _conv1d_kernel, (*ACTIVATIONS, "states_ptr"),
                           dict(WIDTH=4, HAS_BIAS=True, SILU=True, BLOCK_T=64, BLOCK_D=64, BLOCK_W=4)),
    "sm90/conv1d_update": partial(compile_sm90, _conv1d_update_kernel, ACTIVATIONS,
                                  dict(WIDTH=4, HAS_BIAS=True, HAS_SLOTS=True, SILU=True, BLOCK_D=64, BLOCK_W=4)),
    "sm90/conv1d_update-rows-are-slots": partial(compile_sm90, _conv1d_update_kernel, ACTIVATIONS,
                                                 dict(WIDTH=4, HAS_BIAS=True, HAS_SLOTS=False, SILU=True, BLOCK_D=64,
                                                      BLOCK_W=4)),
    # Nemotron-Nano-9B-v2's widths: the block norm over 4,480 channels, the gated one over groups of 1,280
    "sm90/rms_norm": partial(compile_sm90, _rms_norm_kernel, (*ACTIVATIONS, "gate_ptr", "weight_ptr"),
                             dict(GATED=False, BLOCK=8192), dict(num_warps=8)),
    "sm90/gated_rms_norm": partial(compile_sm90, _rms_norm_kernel, (*ACTIVATIONS, "gate_ptr", "weight_ptr"),
                                   dict(GATED=True, BLOCK=2048), dict(num_warps=4)),
    # the decode attention at Nemotron-H-8B's head dim and group of 4, in one part and in parts, and their merge
    **{f"sm90/decode_attention-{splits}-parts": partial(
        compile_sm90, _decode_attention_kernel, ("q_ptr", "keys_ptr", "values_ptr", "out_ptr"),
        dict(SPLITS=splits, BLOCK_G=16, BLOCK_N=ATTENTION_LAUNCH.block_n, BLOCK_D=128,
             DOT_DTYPE=triton.language.bfloat16, DOT_PRECISION="tf32"), dict(num_warps=ATTENTION_LAUNCH.num_warps))
       for splits in (1, 8)},
    "sm90/attention_merge": partial(compile_sm90, _merge_kernel, ("out_ptr",), dict(SPLITS=8, BLOCK_D=128)),
    "sm90/write_kv": partial(compile_sm90, _write_kv_kernel, ("k_ptr", "v_ptr", "keys_ptr", "values_ptr"),
                             dict(BLOCK_D=128)),
    # the GPU path's launch: bf16 dot operands at the default warps, and the decode step at state size 128
    "sm90/no-spills": partial(check_no_spills, ("sm90/chunk_state-bf16", "sm90/chunk_scan-bf16-precomputed-cb-False",
                                                "sm90/state_update", "sm90/rms_norm", "sm90/gated_rms_norm",
                                                "sm90/decode_attention-1-parts", "sm90/decode_attention-8-parts")),
}


def run_cases(names: list[str]) -> dict[str, str | None]:
    """Each case's traceback, or None when it passed."""
    outcomes: dict[str, str | None] = {}
    for name in names:
        try:
            {**CASES, **SM90}[name]()
            outcomes[name] = None
        except Exception:   # noqa: BLE001 - reported to the test that owns the case
            outcomes[name] = traceback.format_exc()
    return outcomes


def compiled_env() -> dict[str, str]:
    """This environment without TRITON_INTERPRET, whatever the caller exported."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_in_subprocess(names: list[str], interpret: bool) -> dict[str, str | None]:
    """The named cases' outcomes from a fresh interpreter, with or without Triton's interpreter."""
    env = compiled_env() | ({"TRITON_INTERPRET": "1"} if interpret else {})
    proc = subprocess.run([sys.executable, "-m", "tests.test_kernels_triton", *names], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


# Triton's interpreter before 3.7 takes a loop bound loaded from memory as int() of a one-element array,
# which numpy 2.4 refuses (a CUDA build of torch 2.11 brings Triton 3.6; the compiled kernels are not affected).
OLD_INTERPRETER = pytest.mark.skipif(
    Version(triton.__version__) < Version("3.7") and Version(numpy.__version__) >= Version("2.4"),
    reason=f"Triton {triton.__version__}'s interpreter fails on numpy {numpy.__version__}: "
           "install triton>=3.7 or numpy<2.4 to run the kernels on CPU")


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str | None]:
    return run_in_subprocess(list(CASES), interpret=True)


@OLD_INTERPRETER
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_ref(case: str, interpreted: dict[str, str | None]) -> None:
    assert interpreted[case] is None, interpreted[case]


@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    """~15 s on 2 cores with Triton's cache cold (~5 s warm), which would push this file past a minute."""
    failures = {name: tb for name, tb in run_in_subprocess(list(SM90), interpret=False).items() if tb}
    assert not failures, "\n".join(failures.values())


def test_decode_step_under_a_dependent_launch_reads_its_state_first() -> None:
    """The one check of ``StepLaunch.pdl`` short of a GPU (``check_dependent_launch``); ~5 s, so it is not
    left to the slow test."""
    outcome = run_in_subprocess(["sm90/state_update-dependent-launch"], interpret=False)
    assert outcome["sm90/state_update-dependent-launch"] is None, outcome["sm90/state_update-dependent-launch"]


def test_attention_splits_fill_the_gpu_at_small_batch_only() -> None:
    """132 multiprocessors (an H100): 8 KV heads at batch 1 take the most parts, at batch 64 one; a short
    cache has no more parts than blocks."""
    assert split_count(8, 4096, 132, 64) == 64
    assert split_count(8 * 4, 4096, 132, 64) == 16
    assert split_count(8 * 64, 4096, 132, 64) == 1
    assert split_count(8, 150, 132, 64) == 2     # 3 blocks of 64 positions: the power of two below, 2 parts
    assert split_count(8, 64, 132, 64) == 1


def test_dispatch_runs_the_reference_on_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    x, weight = randn(g, 1, 7, 5), randn(g, 5, 4)
    out, states = kernels.causal_conv1d(x, weight, None)
    want_out, want_states = causal_conv1d_ref(x, weight, None)
    assert torch.equal(out, want_out) and torch.equal(states, want_states)
    assert kernels.ssd_scan.__name__ == "ssd_scan" and "ssd_scan_ref" in kernels.ssd_scan.__doc__


@OLD_INTERPRETER
def test_bench_cpu_smoke_prints_the_tables() -> None:
    """The GPU benchmark's code paths at tiny shapes; the script sets TRITON_INTERPRET itself."""
    proc = subprocess.run([sys.executable, "-m", "bench.bench_kernels", "--cpu-smoke"], cwd=ROOT, env=compiled_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# rollout kernels | device: CPU") and lines[1].startswith("peak bandwidth")
    first = next(i for i, line in enumerate(lines) if line.split()[:2] == ["batch", "time_us"]) + 1
    decode = [line.split() for line in lines[first:first + 3]]
    assert [row[0] for row in decode] == ["1", "2", "4"] and all(len(row) == 9 for row in decode)
    assert all(row[6] == "-" and float(row[7]) > 0 for row in decode)   # no dependent launch below sm_90
    prefill = next(line.split() for line in lines if line.startswith("ssd_scan "))
    first = next(i for i, line in enumerate(lines) if line.split()[:2] == ["batch", "context"]) + 1
    attention = [line.split() for line in lines[first:first + 2]]
    assert [row[:2] for row in attention] == [["1", "20"], ["3", "20"]] and all(len(row) == 8 for row in attention)
    # rel_err: one bf16 rounding at most
    assert all(float(row[-1]) < 1e-2 for row in [*decode, prefill, *attention])
    assert any(line.startswith("mamba_ssm") and "skipped" in line for line in lines)


@OLD_INTERPRETER
def test_bench_tune_times_correct_variants() -> None:
    """``--tune`` on CPU: a row per launch variant it runs, each within one bf16 rounding of the reference
    (the scan's second variant computes C·Bᵀ in its own kernel)."""
    proc = subprocess.run([sys.executable, "-m", "bench.bench_kernels", "--cpu-smoke", "--tune"], cwd=ROOT,
                          env=compiled_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()

    def rows(header: list[str]) -> list[list[str]]:
        first = next(i for i, line in enumerate(lines) if line.split() == header) + 1
        return [line.split() for line in lines[first:first + 2]]

    decode = rows(["variant", "1", "2", "4", "rel_err"])
    prefill = rows(["variant", "time_ms", "speed", "cumsum", "state", "passing", "cb", "scan", "rel_err"])
    attention = rows(["variant", "1x20", "3x20", "rel_err"])
    assert [row[0] for row in decode] == ["default", "block_p=64,num_warps=4"]
    assert "precompute_cb=True" in prefill[1][0] and all(len(row) == 9 for row in prefill)
    assert [row[0] for row in attention] == ["default", "splits=4"]
    assert all(float(row[-1]) < 1e-2 for row in [*decode, *prefill, *attention])


def test_baseline_loads_without_the_package_init_a_skip_build_install_breaks(tmp_path, monkeypatch) -> None:
    """As installed with MAMBA_SKIP_CUDA_BUILD=TRUE, mamba_ssm's __init__ imports a CUDA extension that is not
    there; the bench still loads the Triton module it times."""
    from bench.bench_kernels import import_skipping_package_init

    package = tmp_path / "fake_mamba"
    (package / "ops" / "triton").mkdir(parents=True)
    (package / "__init__.py").write_text("import selective_scan_cuda_not_built\n")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "triton" / "__init__.py").write_text("")
    (package / "ops" / "triton" / "ssd_combined.py").write_text(
        "from fake_mamba.ops.triton import helpers\ndef mamba_chunk_scan_combined():\n    return helpers.VALUE\n")
    (package / "ops" / "triton" / "helpers.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def forget() -> None:
        for name in [n for n in sys.modules if n.startswith("fake_mamba")]:
            del sys.modules[name]

    try:
        with pytest.raises(ModuleNotFoundError, match="selective_scan_cuda_not_built"):
            importlib.import_module("fake_mamba.ops.triton.ssd_combined")
        forget()
        module = import_skipping_package_init("fake_mamba", "fake_mamba.ops.triton.ssd_combined")
        assert module.mamba_chunk_scan_combined() == 7
    finally:
        forget()


if __name__ == "__main__":
    print(json.dumps(run_cases(sys.argv[1:])))
