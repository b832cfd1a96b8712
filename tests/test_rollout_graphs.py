"""The engine's decode step as CUDA graphs: its padding on CPU, its replay on CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.configs import reduced
from model.factory import build_model
from rollout.engine import RolloutEngine
from rollout.graphs import DecodeGraphs, bucket_sizes
from rollout.sampling import SamplingParams

TEXTS = ["What is 12 plus 30?", "Name a prime", "Why is the sky blue? Explain.", "a", "Count to five", "b c"]


def test_buckets_cover_every_batch_up_to_the_slots():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


def generate_both(model, tokenizer, device: str, capture: bool,
                  params: SamplingParams) -> tuple[list, list, RolloutEngine]:
    """Completions of 6 prompts on 5 slots from the plain decode step and the padded one, and the padded
    engine; stop tokens end sequences at different steps, so the batch passes through several buckets and
    pads, and a thinking budget of 5 makes the engine force tokens at some steps (a graph of its own)."""
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    prompts[1] += tokenizer.encode("<think>", add_special_tokens=False)
    plain = RolloutEngine(model, tokenizer, max_batch=5, max_length=128, device=device, cuda_graphs=False)
    params = dataclasses.replace(params, max_new_tokens=24, thinking_budget=5, stop_token_ids=())
    free = plain.generate(prompts, params)
    params = dataclasses.replace(params, stop_token_ids=(free[0].token_ids[3], free[2].token_ids[9],
                                                         free[4].token_ids[15]))
    padded = RolloutEngine(model, tokenizer, max_batch=5, max_length=128, device=device, cuda_graphs=capture)
    assert plain.graphs is None and (padded.graphs is not None) == capture
    if not capture:   # the CPU twin: the same padded step, run eagerly
        padded.graphs = DecodeGraphs(padded, capture=False)
    return plain.generate(prompts, params), padded.generate(prompts, params), padded


def assert_padding_stayed_finite(engine: RolloutEngine) -> None:
    """Padding rows run in free slots and write their states and KV there; a row that sees no position
    would write NaN, which a later product over those slots could carry into real rows."""
    assert all(torch.isfinite(buffer).all() for buffer in engine.cache.buffers())


GREEDY, SAMPLED = SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=3)


@pytest.mark.parametrize("layout,params", [("tiny", GREEDY), ("nemotron-h-8b", GREEDY), ("tiny", SAMPLED)])
def test_padded_step_equals_the_plain_step(layout, params, tokenizer):
    """The graphs' math on CPU: the step and the token choice run eagerly on batches padded to the buckets."""
    model = build_model(layout, tokenizer, seed=1, **({} if layout == "tiny" else reduced(layout))).eval()
    want, got, engine = generate_both(model, tokenizer, "cpu", False, params)
    assert len({len(o.token_ids) for o in want}) > 2 and any(any(o.forced) for o in want)
    assert_padding_stayed_finite(engine)
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; the CPU twin is above")
@pytest.mark.parametrize("params", [GREEDY, SAMPLED])
def test_cuda_graph_replay_equals_the_plain_step(params, tokenizer):
    model = build_model("nemotron-h-8b", tokenizer, seed=1, **reduced("nemotron-h-8b")).eval()
    want, got, engine = generate_both(model, tokenizer, "cuda", True, params)
    assert {key[0] for key in engine.graphs.graphs} > {5}     # several buckets recorded
    assert_padding_stayed_finite(engine)
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
