"""The kernels' PyTorch references against the plain step-by-step recurrence they stand for."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from rollout.kernels import (causal_conv1d_ref, causal_conv1d_update_ref, selective_state_update_ref,
                             ssd_scan_ref)

H, P, N, G = 4, 8, 6, 2
LIMIT = (0.001, float("inf"))


def recurrence(x, dt, A, B, C, D, dt_bias, state):
    """The SSM one token at a time: x [T, H, P], dt [T, H], B and C [T, G, N], state [H, P, N]."""
    dt = F.softplus(dt + dt_bias).clamp(*LIMIT)
    B, C = B.repeat_interleave(H // G, 1), C.repeat_interleave(H // G, 1)
    ys = []
    for t in range(x.shape[0]):
        state = state * torch.exp(dt[t] * A)[:, None, None] + (dt[t][:, None] * x[t])[..., None] * B[t][:, None]
        ys.append(torch.einsum("hpn,hn->hp", state, C[t]) + D[:, None] * x[t])
    return torch.stack(ys), state


def inputs(T, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(batch, T, H, P), dt=r(batch, T, H), A=-torch.rand(H, generator=g) * 2, B=r(batch, T, G, N),
                C=r(batch, T, G, N), D=r(H), dt_bias=r(H) * 0.5)


@pytest.mark.parametrize("T,chunk", [(1, 4), (13, 4), (16, 16), (37, 8)])
def test_ssd_scan_matches_recurrence(T, chunk):
    a = inputs(T, batch=2)
    init = torch.randn(2, H, P, N)
    y, final = ssd_scan_ref(**a, chunk_size=chunk, dt_limit=LIMIT, initial_states=init)
    for b in range(2):
        want_y, want_state = recurrence(a["x"][b], a["dt"][b], a["A"], a["B"][b], a["C"][b], a["D"], a["dt_bias"],
                                        init[b])
        torch.testing.assert_close(y[b], want_y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(final[b], want_state, atol=1e-4, rtol=1e-4)


def test_packed_sequences_do_not_leak_state():
    """Lengths out of order: the reference runs them longest first and returns them as given, leaving the
    caller's initial states as they were."""
    lengths = [5, 11, 3]
    a = inputs(sum(lengths))
    cu = torch.tensor([0, 5, 16, 19])
    init = torch.randn(3, H, P, N)
    before = init.clone()
    y, finals = ssd_scan_ref(**a, chunk_size=4, dt_limit=LIMIT, initial_states=init, cu_seqlens=cu)
    assert torch.equal(init, before)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        want_y, want_state = recurrence(a["x"][0, s:e], a["dt"][0, s:e], a["A"], a["B"][0, s:e], a["C"][0, s:e],
                                        a["D"], a["dt_bias"], init[i])
        torch.testing.assert_close(y[0, s:e], want_y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(finals[i], want_state, atol=1e-4, rtol=1e-4)


def test_packed_scan_in_slices_of_the_decay_budget_matches_recurrence(monkeypatch):
    """Long prompts build their intra-chunk decay matrices a few chunks at a time: with a budget of one
    element, one chunk per slice, the scan still equals the recurrence, and an empty sequence keeps its
    initial state."""
    monkeypatch.setattr(importlib.import_module("rollout.kernels.ssd_scan"), "_DECAY_BUDGET", 1)
    cu = torch.tensor([0, 9, 9, 12, 25])
    a = inputs(25, seed=3)
    init = torch.randn(4, H, P, N)
    y, finals = ssd_scan_ref(**a, chunk_size=4, dt_limit=LIMIT, initial_states=init, cu_seqlens=cu)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if s == e:
            assert torch.equal(finals[i], init[i])
            continue
        want_y, want_state = recurrence(a["x"][0, s:e], a["dt"][0, s:e], a["A"], a["B"][0, s:e], a["C"][0, s:e],
                                        a["D"], a["dt_bias"], init[i])
        torch.testing.assert_close(y[0, s:e], want_y, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(finals[i], want_state, atol=1e-4, rtol=1e-4)


def test_strong_decay_does_not_overflow():
    a = inputs(64)
    a["dt"] = a["dt"] + 30.0        # dt ~ 30: exp of the cumulative decay underflows to 0, never inf
    a["A"] = a["A"] - 50.0
    y, final = ssd_scan_ref(**a, chunk_size=64, dt_limit=LIMIT)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()


def test_state_update_continues_the_scan_and_skips_padding():
    a = inputs(9)
    _, prefix_state = ssd_scan_ref(**{k: (v[:, :8] if v.dim() > 1 else v) for k, v in a.items()}, chunk_size=4,
                                   dt_limit=LIMIT)
    y_full, final = ssd_scan_ref(**a, chunk_size=4, dt_limit=LIMIT)
    states = torch.zeros(3, H, P, N)
    states[2] = prefix_state[0]
    last = {k: a[k][:, 8] for k in ("x", "dt", "B", "C")}
    x = torch.cat([last["x"], torch.randn(1, H, P)])                    # second row is padding
    dt, B, C = (torch.cat([last[k], torch.randn_like(last[k])]) for k in ("dt", "B", "C"))
    before = states.clone()
    y = selective_state_update_ref(states, x, dt, a["A"], B, C, a["D"], a["dt_bias"],
                                   slot_idx=torch.tensor([2, -1]), dt_limit=LIMIT)
    torch.testing.assert_close(y[0], y_full[0, 8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[2], final[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(y[1], torch.zeros_like(y[1])) and torch.equal(states[:2], before[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_update_of_the_first_slots_equals_the_slot_indexed_one(dtype):
    """slot_idx None (row i is slot i: an fp32 state is updated where it lies) against explicit slots."""
    g = torch.Generator().manual_seed(1)
    x, dt, B, C = (torch.randn(*s, generator=g) for s in ((3, H, P), (3, H), (3, G, N), (3, G, N)))
    A, D, dt_bias = -torch.rand(H, generator=g), torch.randn(H, generator=g), torch.randn(H, generator=g)
    state = torch.randn(5, H, P, N, generator=g).to(dtype)
    by_slot, in_place = state.clone(), state.clone()
    y_slot = selective_state_update_ref(by_slot, x, dt, A, B, C, D, dt_bias, slot_idx=torch.arange(3), dt_limit=LIMIT)
    y = selective_state_update_ref(in_place, x, dt, A, B, C, D, dt_bias, slot_idx=None, dt_limit=LIMIT)
    assert torch.equal(y, y_slot) and torch.equal(in_place, by_slot)
    assert not torch.equal(in_place[:3], state[:3]) and torch.equal(in_place[3:], state[3:])


def test_conv1d_prefill_then_update_equals_full_conv():
    dim, width = 10, 4
    x = torch.randn(1, 12, dim)
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    cu = torch.tensor([0, 2, 12])                                        # a sequence shorter than width - 1
    out, states = causal_conv1d_ref(x, weight, bias, cu_seqlens=cu)
    for s, e, i in ((0, 2, 0), (2, 12, 1)):
        seq = x[0, s:e].T[None]
        want = F.silu(F.conv1d(F.pad(seq, (width - 1, 0)), weight[:, None], bias, groups=dim))[0].T
        torch.testing.assert_close(out[0, s:e], want)
    assert torch.equal(states[0], F.pad(x[0, :2].T, (1, 0)))          # its two inputs after one zero
    slots = torch.zeros(4, dim, width - 1)
    slots[3] = states[1]
    step = torch.randn(2, dim)
    y = causal_conv1d_update_ref(step, slots, weight, bias, slot_idx=torch.tensor([3, -1]))
    seq = torch.cat([x[0, 2:12], step[:1]]).T[None]
    want = F.silu(F.conv1d(seq, weight[:, None], bias, groups=dim))[0, :, -1]
    torch.testing.assert_close(y[0], want)
    assert torch.equal(y[1], torch.zeros(dim)) and torch.equal(slots[3], seq[0, :, -(width - 1):])


def test_packed_sequences_must_cover_the_row():
    a = inputs(12)
    with pytest.raises(ValueError, match="cu_seqlens end at token 10, not at the end of the row"):
        ssd_scan_ref(**a, chunk_size=4, cu_seqlens=torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="cu_seqlens end at token 10, not at the end of the row"):
        causal_conv1d_ref(a["x"].flatten(2), torch.randn(H * P, 4), None, cu_seqlens=torch.tensor([0, 4, 10]))
