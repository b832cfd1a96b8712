"""The tiny layout's Mamba chunk size is a speed setting only: training math is the same at any chunk size."""

from __future__ import annotations

from bench.bench_train_step import grad_gap, sft_batch, step
from model.configs import layout
from model.factory import build_model


def test_tiny_chunk_size_gives_the_losses_and_gradients_of_a_64_token_chunk(tokenizer):
    chunk = layout("tiny")["chunk_size"]
    batch = sft_batch(tokenizer, 8)
    assert batch["input_ids"].shape[1] > 2 * chunk  # several chunks per row, padding included
    assert (batch["attention_mask"] == 0).any()
    reference = build_model("tiny", tokenizer, chunk_size=64)
    model = build_model("tiny", tokenizer)
    model.load_state_dict(reference.state_dict())
    assert abs(step(reference, batch) - step(model, batch)) < 1e-5
    assert grad_gap(reference, model) < 1e-5
    assert max(p.grad.abs().max().item() for p in model.parameters()) > 1e-3  # the gradients are not all zero
