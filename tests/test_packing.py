"""Batching must not change per-token losses; packing is only allowed where it is exact for Mamba layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_blends.chat import conversation, tokenize_conversation
from model.packing import packed_and_separate_logits, packed_inputs, packing_is_exact


def _token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")


def test_padded_batch_gives_the_same_per_token_losses_as_one_by_one(tiny_model, tokenizer, sample_rows):
    """Right padding with an attention mask, the batching SFT uses, is exact for Mamba and attention."""
    sequences = [torch.tensor(tokenize_conversation(tokenizer, conversation(r, True))["input_ids"])
                 for r in sample_rows[:4]]
    assert len({len(s) for s in sequences}) > 1
    width = max(len(s) for s in sequences)
    batch = torch.full((len(sequences), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(batch)
    for i, s in enumerate(sequences):
        batch[i, : len(s)], mask[i, : len(s)] = s, 1
    tiny_model.eval()
    with torch.no_grad():
        batched = tiny_model(input_ids=batch, attention_mask=mask).logits
        for i, s in enumerate(sequences):
            alone = tiny_model(input_ids=s[None]).logits[0]
            torch.testing.assert_close(_token_losses(batched[i, : len(s)], s), _token_losses(alone, s),
                                       atol=1e-5, rtol=1e-5)


def test_packing_verdict_matches_a_direct_comparison(tiny_model):
    """Without state resets, the second packed example sees the first one's Mamba state."""
    torch.manual_seed(0)
    sequences = [torch.randint(0, tiny_model.config.vocab_size, (n,)) for n in (9, 6)]
    exact = packing_is_exact(tiny_model)
    try:
        packed, separate = packed_and_separate_logits(tiny_model, sequences)
        agrees = torch.allclose(packed, separate, atol=1e-4)
    except ValueError:
        agrees = False
    assert exact == agrees
    if not exact:  # the PyTorch path: show the leak itself, with the boundary information dropped
        inputs = packed_inputs(sequences)
        with torch.no_grad():
            leaky = tiny_model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits[0]
            separate = torch.cat([tiny_model(input_ids=s[None]).logits[0] for s in sequences])
        first = len(sequences[0])
        torch.testing.assert_close(leaky[:first], separate[:first], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(leaky[first:], separate[first:], atol=1e-3)
