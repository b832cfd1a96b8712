"""The engine's piecewise CUDA-graph decode step: its plan and padding on CPU, its replay on CUDA."""

from __future__ import annotations

import pytest
import torch

from model.configs import reduced
from model.factory import build_model
from rollout.engine import ATTENTION, RolloutEngine
from rollout.graphs import PiecewiseDecode, Stretch, bucket_sizes, plan
from rollout.sampling import SamplingParams

TEXTS = ["What is 12 plus 30?", "Name a prime", "Why is the sky blue? Explain.", "a", "Count to five", "b c"]


def test_buckets_cover_every_batch_up_to_the_slots():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


def test_plan_cuts_the_step_at_attention_layers():
    assert plan([False, True, False, False, True]) == [
        Stretch((0,), embed=True, logits=False), 1, Stretch((2, 3), embed=False, logits=False), 4,
        Stretch((), embed=False, logits=True)]
    assert plan([True, False]) == [Stretch((), embed=True, logits=False), 0, Stretch((1,), embed=False, logits=True)]
    assert plan([False, False]) == [Stretch((0, 1), embed=True, logits=True)]
    # Nothing to record between two attention layers in a row (a Transformer's pattern is all of them).
    assert plan([False, True, True, False]) == [
        Stretch((0,), embed=True, logits=False), 1, 2, Stretch((3,), embed=False, logits=True)]


def generate_both(model, tokenizer, device: str, capture: bool) -> tuple[list, list, RolloutEngine]:
    """Greedy completions of 6 prompts on 5 slots from the plain decode step and the piecewise one, and the
    piecewise engine; stop tokens end sequences at different steps, so the batch passes through several
    buckets and pads."""
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    plain = RolloutEngine(model, tokenizer, max_batch=5, max_length=128, device=device, cuda_graphs=False)
    free = plain.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=()))
    params = SamplingParams(max_new_tokens=24, temperature=0,
                            stop_token_ids=(free[0].token_ids[3], free[2].token_ids[9], free[4].token_ids[15]))
    piecewise = RolloutEngine(model, tokenizer, max_batch=5, max_length=128, device=device, cuda_graphs=capture)
    assert plain.graphs is None and (piecewise.graphs is not None) == capture
    if not capture:   # the CPU twin: the same padded stretches, run eagerly
        attention = [block.block_type == ATTENTION for block in piecewise.model.model.layers]
        piecewise.graphs = PiecewiseDecode(piecewise, attention, capture=False)
    return plain.generate(prompts, params), piecewise.generate(prompts, params), piecewise


def assert_padding_stayed_finite(engine: RolloutEngine) -> None:
    """Padding rows run in free slots and write their states and KV there; a row that sees no position
    would write NaN, which a later product over those slots could carry into real rows."""
    assert all(torch.isfinite(buffer).all() for buffer in engine.cache.buffers())


@pytest.mark.parametrize("layout", ["tiny", "nemotron-h-8b"])
def test_padded_piecewise_step_equals_the_plain_step(layout, tokenizer):
    """The graphs' math on CPU: stretches run eagerly on batches padded to the buckets."""
    model = build_model(layout, tokenizer, seed=1, **({} if layout == "tiny" else reduced(layout))).eval()
    want, got, engine = generate_both(model, tokenizer, "cpu", capture=False)
    assert len({len(o.token_ids) for o in want}) > 2
    assert_padding_stayed_finite(engine)
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; the CPU twin is above")
def test_cuda_graph_replay_equals_the_plain_step(tokenizer):
    model = build_model("nemotron-h-8b", tokenizer, seed=1, **reduced("nemotron-h-8b")).eval()
    want, got, engine = generate_both(model, tokenizer, "cuda", capture=True)
    assert_padding_stayed_finite(engine)
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
