"""Is packing several examples into one row exact for this model?

Attention layers separate packed examples through position ids / sequence lengths, but a Mamba layer
only does if its scan and convolution reset the state at each example boundary (``seq_idx`` in the
mamba_ssm kernels). The PyTorch fallback of transformers ignores ``seq_idx``, so state leaks from one
example into the next. Rather than trust a version check, run the model both ways and compare.
"""

from __future__ import annotations

import torch


def packed_inputs(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One row holding all sequences, in the padding-free form TRL's collator produces."""
    lengths = torch.tensor([len(s) for s in sequences])
    cu_seq_lens = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    return {
        "input_ids": torch.cat(sequences)[None],
        "position_ids": torch.cat([torch.arange(len(s)) for s in sequences])[None],
        "seq_idx": torch.repeat_interleave(torch.arange(len(sequences), dtype=torch.int32), lengths)[None],
        "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": int(lengths.max()), "max_length_k": int(lengths.max()),
    }


@torch.no_grad()
def packed_and_separate_logits(model: torch.nn.Module, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the sequences run packed in one row and run one at a time, both (total_len, vocab)."""
    was_training = model.training
    model.eval()
    packed = model(**packed_inputs(sequences)).logits[0]
    separate = torch.cat([model(input_ids=s[None]).logits[0] for s in sequences])
    model.train(was_training)
    return packed, separate


def packing_is_exact(model: torch.nn.Module, atol: float = 1e-4) -> bool:
    """Run two random sequences packed and separately; exact means the logits agree."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    sequences = [torch.randint(0, vocab, (n,), generator=generator).to(device) for n in (11, 7)]
    try:
        packed, separate = packed_and_separate_logits(model, sequences)
    except ValueError:  # transformers refuses packed rows when no kernel can keep them apart
        return False
    return torch.allclose(packed.float(), separate.float(), atol=atol)
