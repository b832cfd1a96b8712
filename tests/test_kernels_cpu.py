"""The engine's C++ kernels on CPU (decode and prefill) against their PyTorch references, and the engine
without them."""

from __future__ import annotations

import os
import time

import pytest
import torch

from rollout import kernels
from rollout.engine import RolloutEngine
from rollout.kernels import cpu
from rollout.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not cpu.build(), reason="no C++ compiler builds the CPU kernels")


def attention_inputs(batch: int, kv_heads: int, group: int, head_dim: int, span: int, seed: int = 0):
    """Keys position-major in a cache of more slots and positions than read, as the engine stores them on CPU;
    row i reads positions up to its own (the last row up to span - 1). Positions past a row's hold NaN: the
    kernel must not read them."""
    g = torch.Generator().manual_seed(seed)
    slots, max_length = batch + 2, span + 5
    keys = torch.randn(slots, kv_heads, head_dim, max_length, generator=g).transpose(2, 3)
    values = torch.randn(slots, kv_heads, max_length, head_dim, generator=g)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=g)
    positions = torch.randint(0, span, (batch,), generator=g)
    positions[-1] = span - 1
    poisoned = [t.clone() for t in (keys, values)]      # clones keep the strides
    for row, position in enumerate(positions.tolist()):
        for t in poisoned:
            t[row, :, position + 1:] = float("nan")
    return q, (keys, values), tuple(poisoned), positions


@pytest.mark.parametrize("kv_heads,group,head_dim,span", [
    (2, 2, 24, 37),     # the tiny model
    (1, 5, 64, 19),     # Nemotron Nano 2's group of 5 query heads: run as 4 and 1
    (8, 4, 128, 9),     # Nemotron-H-8B
    (2, 3, 8, 8),
    (1, 1, 16, 1),
])
@pytest.mark.parametrize("write", [False, True])
def test_decode_attention_matches_ref(kv_heads: int, group: int, head_dim: int, span: int, write: bool) -> None:
    """With ``write``, each row's key and value at its position come from the step's k and v, written into the
    cache first; the reference reads the finite cache over its whole length, the kernel the poisoned one."""
    q, (keys, values), (poisoned_keys, poisoned_values), positions = attention_inputs(5, kv_heads, group, head_dim,
                                                                                      span)
    assert cpu.fits_attention(q, keys)
    new = {}
    if write:
        g = torch.Generator().manual_seed(3)
        new = dict(k=torch.randn(5, kv_heads, head_dim, generator=g), v=torch.randn(5, kv_heads, head_dim, generator=g))
    want = kernels.decode_attention_ref(q, keys, values, positions, head_dim ** -0.5, **new)
    got = kernels.decode_attention_cpp(q, poisoned_keys, poisoned_values, positions, head_dim ** -0.5, **new)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if write:
        rows = torch.arange(5)
        for cache in (keys, poisoned_keys):
            assert torch.equal(cache[rows, :, positions], new["k"])
        for cache in (values, poisoned_values):
            assert torch.equal(cache[rows, :, positions], new["v"])


def test_decode_attention_refuses_a_position_outside_the_cache() -> None:
    q, (keys, values), _, positions = attention_inputs(3, 2, 2, 24, 11)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.decode_attention_cpp(q, keys, values, positions + keys.shape[2], 0.2)


def test_decode_attention_dispatch() -> None:
    """The kernel where it fits (position-major float32 keys), the reference for row-major or bf16 keys."""
    q, (keys, values), _, positions = attention_inputs(3, 2, 2, 24, 11)

    def ops(*args):
        with torch.profiler.profile() as prof:
            out = kernels.decode_attention(*args, 0.2)
        return out, {e.name for e in prof.events()}

    out, names = ops(q, keys, values, positions)
    assert f"{cpu.NAMESPACE}::decode_attention" in names
    row_major, ref_names = ops(q, keys.contiguous(), values, positions)
    assert f"{cpu.NAMESPACE}::decode_attention" not in ref_names and "aten::bmm" in ref_names
    torch.testing.assert_close(out, row_major, rtol=1e-5, atol=1e-5)
    assert not cpu.fits_attention(q.bfloat16(), keys.bfloat16())


def mamba_step_inputs(batch: int, heads: int, head_dim: int, state: int, groups: int, bias: bool) -> dict:
    """A Mamba layer's in_proj output and states in more slots than rows, conv width 4; dt of row 0 head 0 past
    softplus's threshold, of the last row's last head under the lower limit."""
    g = torch.Generator().manual_seed(2)
    inner, slots = heads * head_dim, batch + 2
    conv_dim = inner + 2 * groups * state
    projected = torch.randn(batch, inner + conv_dim + heads, generator=g)
    projected[0, inner + conv_dim] = 25.0
    projected[-1, -1] = -30.0
    return dict(projected=projected, conv_state=torch.randn(slots, 3, conv_dim, generator=g),
                conv_weight=torch.randn(4, conv_dim, generator=g) / 2,
                conv_bias=torch.randn(conv_dim, generator=g) if bias else None,
                ssm_state=torch.randn(slots, heads, head_dim, state, generator=g),
                A=-torch.rand(heads, generator=g) * 3, D=torch.randn(heads, generator=g),
                dt_bias=torch.randn(heads, generator=g), norm_weight=torch.randn(inner, generator=g))


@pytest.mark.parametrize("heads,head_dim,state,groups,group_size,bias", [
    (8, 24, 16, 1, 192, True),      # the tiny model
    (16, 8, 12, 4, 32, False),      # several groups of B and C, of the norm, and no conv bias
    (4, 64, 128, 2, 128, True),     # Nemotron-H-8B's head dim and state
    (6, 10, 12, 2, 20, True),       # head dim, norm groups and conv channels not multiples of 8
])
def test_mamba_step_matches_ref(heads: int, head_dim: int, state: int, groups: int, group_size: int,
                                bias: bool) -> None:
    """Output, both states in place, and the slots past the batch untouched."""
    batch = 5
    got = mamba_step_inputs(batch, heads, head_dim, state, groups, bias)
    want = {k: None if v is None else v.clone() for k, v in got.items()}
    before = {k: got[k].clone() for k in ("conv_state", "ssm_state")}
    assert kernels.fits_mamba_step(got["projected"], got["ssm_state"])
    kw = dict(eps=1e-5, group_size=group_size, dt_limit=(0.01, 4.0))
    out = kernels.mamba_step_cpp(**got, **kw)
    torch.testing.assert_close(out, kernels.mamba_step_ref(**want, **kw), rtol=1e-5, atol=1e-5)
    for name in ("conv_state", "ssm_state"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
        assert not torch.equal(got[name][:batch], before[name][:batch])
        assert torch.equal(got[name][batch:], before[name][batch:])


@pytest.mark.parametrize("lengths,heads,head_dim,state,groups,group_size,bias", [
    ([5, 1, 2, 40], 8, 24, 16, 1, 192, True),     # the tiny model; prompts shorter than the conv's width
    ([3, 17], 16, 8, 12, 4, 32, False),
    ([70], 4, 64, 128, 2, 128, True),
    ([9, 4], 6, 10, 12, 2, 20, True),
])
def test_mamba_prefill_matches_ref(lengths: list[int], heads: int, head_dim: int, state: int, groups: int,
                                   group_size: int, bias: bool) -> None:
    """Outputs, and each sequence's final states in its slot (the slots shuffled, the others untouched)."""
    nseq = len(lengths)
    a = mamba_step_inputs(sum(lengths), heads, head_dim, state, groups, bias)
    slots = torch.randperm(len(a["ssm_state"]), generator=torch.Generator().manual_seed(4))[:nseq]
    got = dict(a, cu_seqlens=torch.tensor([0, *lengths]).cumsum(0), slots=slots)
    want = {k: None if v is None else v.clone() for k, v in got.items()}
    before = {k: got[k].clone() for k in ("conv_state", "ssm_state")}
    kw = dict(eps=1e-5, group_size=group_size, dt_limit=(0.01, 4.0))
    out = kernels.mamba_prefill_cpp(**got, **kw)
    torch.testing.assert_close(out, kernels.mamba_prefill_ref(**want, **kw, chunk_size=16), rtol=1e-4, atol=1e-4)
    untouched = sorted(set(range(len(a["ssm_state"]))) - set(slots.tolist()))
    for name in ("conv_state", "ssm_state"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4)
        assert torch.equal(got[name][untouched], before[name][untouched])


def test_engine_equals_itself_on_the_references(tiny_model, tokenizer, monkeypatch) -> None:
    """Where the kernels cannot be built the references run, on the same position-major key cache: the same
    tokens, log-probabilities within float rounding."""
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in ("What is 12 plus 30?", "Name a prime", "a")]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    with_kernels = RolloutEngine(tiny_model, tokenizer, max_batch=3, max_length=64).generate(prompts, params)
    monkeypatch.setattr(cpu, "_built", False)
    without = RolloutEngine(tiny_model, tokenizer, max_batch=3, max_length=64).generate(prompts, params)
    assert [c.token_ids for c in with_kernels] == [c.token_ids for c in without]
    for a, b in zip(with_kernels, without):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)


def test_a_stale_build_lock_is_removed(monkeypatch) -> None:
    """A lock left by a killed build would make every later build wait forever."""
    lock = cpu.build_directory() / "lock"
    lock.touch()
    old = time.time() - cpu.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    monkeypatch.setattr(cpu, "_built", None)
    with pytest.warns(UserWarning, match="did not finish"):
        assert cpu.build()
    assert not lock.exists()


def test_a_failed_build_warns_and_leaves_the_references(tmp_path, monkeypatch) -> None:
    """No writable build directory (here its parent is a file): a warning naming it, and every op takes the
    reference."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(cpu, "build_directory", lambda: blocker / "build")
    monkeypatch.setattr(cpu, "_built", None)
    with pytest.warns(UserWarning, match="could not be built in .*file/build"):
        assert not cpu.build()
    q, (keys, values), _, bias = attention_inputs(3, 2, 2, 24, 11)
    assert not cpu.fits_attention(q, keys)
    assert not cpu.fits_mamba_step(torch.zeros(3, 424), torch.zeros(3, 8, 24, 16))
