"""The Triton kernels compiled for a GPU, at Nemotron-H's head shapes, with bf16 activations: the path the engine
takes there (bf16 dot operands, entering states written in bf16, the chunk table written by the chunk cumsum,
packed prompts with their own initial states), against the references.

The tolerance is the bench's: the largest difference over the largest reference value, below 1e-2 (one bf16
rounding of the operands). The CPU twins are the interpreter cases of ``test_kernels_triton.py``: the same
kernels and launchers at small shapes, where dot operands stay fp32.
"""

from __future__ import annotations

import pytest
import torch

from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHRMSNorm, NemotronHRMSNormGated

from rollout.kernels import state_update
from rollout.kernels import (causal_conv1d_ref, causal_conv1d_triton, decode_attention_ref, decode_attention_triton,
                             gated_rms_norm_triton, rms_norm_triton, selective_state_update_ref,
                             selective_state_update_triton, ssd_scan_ref, ssd_scan_triton)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU; the interpreter cases of "
                                "test_kernels_triton.py are the CPU twins")

HEADS, HEADDIM, DSTATE, GROUPS = 16, 64, 128, 2      # Nemotron-H-8B's head shapes, fewer heads
LIMIT = (0.001, float("inf"))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def bf16(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device="cuda").bfloat16()


def fp32(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device="cuda")


@pytest.mark.parametrize("lengths", [(1000, 1000), (300, 1, 129, 700)], ids=["two-rows", "packed"])
def test_ssd_scan(lengths: tuple[int, ...]) -> None:
    """Equal rows, or prompts packed into one row (lengths past, at and under one chunk of 128)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    packed = len(set(lengths)) > 1
    batch, T = (1, sum(lengths)) if packed else (len(lengths), lengths[0])
    args = dict(x=bf16(g, batch, T, HEADS, HEADDIM), dt=bf16(g, batch, T, HEADS),
                A=-torch.rand(HEADS, generator=g, device="cuda") * 8 - 1, B=bf16(g, batch, T, GROUPS, DSTATE),
                C=bf16(g, batch, T, GROUPS, DSTATE), D=fp32(g, HEADS), dt_bias=fp32(g, HEADS) * 0.5)
    cu = torch.tensor([0, *lengths], device="cuda").cumsum(0) if packed else None
    kw = dict(chunk_size=128, dt_limit=LIMIT, initial_states=fp32(g, len(lengths), HEADS, HEADDIM, DSTATE),
              cu_seqlens=cu)
    (y, final), (want_y, want_final) = ssd_scan_triton(**args, **kw), ssd_scan_ref(**args, **kw)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert rel_err(y, want_y) < 1e-2 and rel_err(final, want_final) < 1e-2


def test_state_update() -> None:
    """Slots permuted, one padding row: the default launch's rows per program cover the head dim."""
    g = torch.Generator(device="cuda").manual_seed(1)
    batch, nslots = 9, 12
    slots = torch.tensor([3, 0, 11, -1, 5, 7, 1, 2, 9], device="cuda")
    state = fp32(g, nslots, HEADS, HEADDIM, DSTATE)
    args = (bf16(g, batch, HEADS, HEADDIM), bf16(g, batch, HEADS), -torch.rand(HEADS, generator=g, device="cuda"),
            bf16(g, batch, GROUPS, DSTATE), bf16(g, batch, GROUPS, DSTATE), fp32(g, HEADS), fp32(g, HEADS) * 0.5)
    got, want = state.clone(), state.clone()
    y = selective_state_update_triton(got, *args, slot_idx=slots, dt_limit=LIMIT)
    want_y = selective_state_update_ref(want, *args, slot_idx=slots, dt_limit=LIMIT)
    assert rel_err(y, want_y) < 1e-2 and rel_err(got, want) < 1e-2
    assert torch.equal(got[[4, 6, 8, 10]], state[[4, 6, 8, 10]]) and not y[3].any()


@pytest.mark.parametrize("batch", [1, 64])
def test_decode_attention(batch: int) -> None:
    """Nemotron-H-8B's attention heads (32 query heads on 8 KV heads of 128), bf16, a cache of 4,096 positions:
    at batch 1 the rows split into many parts, at 64 into few. Rows at the first position, inside a block, on
    a block's edge and at the last position; the caches written in place equal the reference's."""
    g = torch.Generator(device="cuda").manual_seed(2)
    kv_heads, length = 8, 4096
    keys, values = bf16(g, batch + 2, kv_heads, length, 128), bf16(g, batch + 2, kv_heads, length, 128)
    q, k, v = bf16(g, batch, 32, 128), bf16(g, batch, kv_heads, 128), bf16(g, batch, kv_heads, 128)
    positions = torch.randint(0, length, (batch,), generator=g, device="cuda")
    positions[: min(batch, 4)] = torch.tensor([0, 37, 63, length - 1], device="cuda")[:batch]
    got, want = [t.clone() for t in (keys, values)], [t.clone() for t in (keys, values)]
    out = decode_attention_triton(q, *got, positions, 128 ** -0.5, k, v)
    assert rel_err(out, decode_attention_ref(q, *want, positions, 128 ** -0.5, k, v)) < 1e-2
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda-graph"])
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "dependent-launch"])
def test_state_update_back_to_back(pdl: bool, graphed: bool, monkeypatch) -> None:
    """Steps on distinct states, rows in the first slots, each x written by the kernel just before the step:
    under a dependent launch (on sm_90 and up) the step reads its state early and must wait for that x."""
    monkeypatch.setattr(state_update, "STEP_LAUNCH", state_update.StepLaunch(pdl=pdl))
    g = torch.Generator(device="cuda").manual_seed(2)
    batch = 4
    x = bf16(g, batch, HEADS, HEADDIM)
    rest = (bf16(g, batch, HEADS), -torch.rand(HEADS, generator=g, device="cuda"), bf16(g, batch, GROUPS, DSTATE),
            bf16(g, batch, GROUPS, DSTATE), fp32(g, HEADS), fp32(g, HEADS) * 0.5)
    states = [fp32(g, batch, HEADS, HEADDIM, DSTATE) for _ in range(3)]
    wants = [s.clone() for s in states]

    def steps(op, on: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(s, x * (i + 2), *rest, slot_idx=None, dt_limit=LIMIT) for i, s in enumerate(on)]

    if graphed:
        graph = torch.cuda.CUDAGraph()
        warm = [s.clone() for s in states]
        steps(selective_state_update_triton, warm)      # compiles outside the recording
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            ys = steps(selective_state_update_triton, states)
        graph.replay()
    else:
        ys = steps(selective_state_update_triton, states)
    for y, want_y, got, want in zip(ys, steps(selective_state_update_ref, wants), states, wants):
        assert rel_err(y, want_y) < 1e-2 and rel_err(got, want) < 1e-2


def test_conv1d_packed() -> None:
    g = torch.Generator(device="cuda").manual_seed(2)
    dim, cu = HEADS * HEADDIM + 2 * GROUPS * DSTATE, torch.tensor([0, 2, 130, 500], device="cuda")
    args = (bf16(g, 1, 500, dim), bf16(g, dim, 4), bf16(g, dim))
    (out, states), (want_out, want_states) = (causal_conv1d_triton(*args, cu_seqlens=cu),
                                              causal_conv1d_ref(*args, cu_seqlens=cu))
    assert rel_err(out, want_out) < 1e-2 and rel_err(states, want_states) < 1e-2


@pytest.mark.parametrize("gated", [False, True], ids=["block", "gated"])
def test_norms_round_where_the_modules_do(gated: bool) -> None:
    """Nemotron-Nano-9B-v2's widths (4,480 channels; 10,240 in 8 groups), bf16, a decode batch of 64: the kernel
    equals transformers' module but where a sum taken in another order moves the last bit. Rounding before the
    weight multiply, as the block norm did up to transformers 5.17, leaves about 73% of the values equal."""
    g = torch.Generator(device="cuda").manual_seed(3)
    width, group = (10240, 1280) if gated else (4480, 4480)
    module = (NemotronHRMSNormGated(width, group, eps=1e-5) if gated else NemotronHRMSNorm(width, eps=1e-5))
    module = module.to("cuda", torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(bf16(g, width) + 1)
    x, gate = bf16(g, 64, width) * 3, bf16(g, 64, width)
    if gated:
        got, want = gated_rms_norm_triton(x, gate, module.weight, eps=1e-5, group_size=group), module(x, gate)
    else:
        got, want = rms_norm_triton(x, module.weight, eps=1e-5), module(x)
    assert got.dtype == want.dtype and rel_err(got, want) < 1e-2
    assert (got == want).float().mean() >= 0.99
