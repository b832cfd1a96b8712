"""bench_rollout's floor: it must time the very matrix products a decode step runs, no more and no fewer."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from bench.bench_rollout import matrix_products
from model.configs import reduced
from model.factory import build_model
from rollout.engine import RolloutEngine
from rollout.sampling import SamplingParams

PRODUCTS = ("aten::linear", "aten::matmul")


def products_of(fn) -> Counter:
    """The (op, input shapes) of every projection and matrix product ``fn`` runs."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return Counter((e.name, str(e.input_shapes)) for e in prof.events() if e.name in PRODUCTS)


@pytest.mark.parametrize("layout", ["tiny", "nemotron-h-8b"])
def test_matrix_products_are_those_of_a_decode_step(layout, tokenizer):
    model = build_model(layout, tokenizer, seed=0, **(reduced(layout) if layout != "tiny" else {})).eval()
    engine = RolloutEngine(model, tokenizer, max_batch=3, max_length=32)
    prompts = [tokenizer.encode(t, add_special_tokens=False)[:9] for t in ("What is 12 plus 30?", "Name a prime", "a")]
    engine.generate(prompts, SamplingParams(max_new_tokens=2, temperature=0))       # allocates the cache
    batch, length = 3, 9
    positions = torch.full((batch,), length)
    bias = engine._attention_bias(torch.arange(length + 1), positions)
    with torch.no_grad():
        step = products_of(lambda: engine._decode_step(torch.zeros(batch, dtype=torch.long), positions, bias))
    floor = products_of(lambda: matrix_products(engine, batch, length, 1))
    assert floor == step
    assert sum(n for (name, _), n in step.items() if name == "aten::matmul") >= 2     # attention's products are in
