"""Sampling settings and the token choice of the rollout engine.

Log-probabilities are taken under the distribution tokens are actually drawn from (after temperature,
top-k and top-p), which is what an importance-sampling correction in GRPO divides by. Greedy decoding
reports the model's own log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How to generate: ``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1 disable those filters.

    ``stop_token_ids`` default to the tokenizer's end-of-sequence token. ``thinking_budget`` caps the tokens
    written inside ``<think>``: once spent, the engine writes ``</think>`` itself and the model answers.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    thinking_budget: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling settings: temperature={self.temperature}, top_k={self.top_k}, "
                             f"top_p={self.top_p}")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise ValueError(f"thinking_budget must be >= 0, got {self.thinking_budget}")


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities [batch, vocab] of the distribution tokens are drawn from (-inf where filtered)."""
    logits = logits.float()
    if params.temperature == 0:
        return torch.log_softmax(logits, dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.log_softmax(logits, dim=-1)


class Draws:
    """One sequence's uniform draws in [0, 1), one per token it writes, from its own seed.

    A generator per sequence makes a sequence's samples independent of which other sequences share its
    batch (a seed reproduces the same completions under any batching), while each decode step still
    turns the whole batch's draws into tokens in one call (``choose_tokens``). Draws are made in blocks
    as the sequence grows, so a long ``max_new_tokens`` costs nothing until it is used.
    """

    block = 64

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.start, self.values = 0, []

    def at(self, index: int) -> float:
        """The draw for token ``index`` of the sequence; indices come in increasing order."""
        while index >= self.start + len(self.values):
            self.start += len(self.values)
            self.values = torch.rand(self.block, generator=self.generator, dtype=torch.float64).tolist()
        return self.values[index - self.start]


def choose_tokens(logprobs: torch.Tensor, params: SamplingParams, draws: torch.Tensor | None) -> torch.Tensor:
    """One token per row: argmax when greedy, else the inverse of the row's CDF at its draw [batch] in [0, 1).

    A row's token is the first whose cumulative probability exceeds draw x total mass, so a token of zero
    probability (filtered by top-k or top-p) is never chosen: its cumulative sum equals the one before it.
    """
    if params.temperature == 0:
        return logprobs.argmax(-1)
    cdf = logprobs.double().exp().cumsum(-1)
    total = cdf[:, -1:]
    # A draw that rounds up to the total mass would land past the vocabulary; just below the total it
    # lands on the last token of nonzero probability.
    target = torch.minimum(draws[:, None].to(cdf) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]


def pick(logits: torch.Tensor, params: SamplingParams, draws: torch.Tensor | None,
         forced: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's next token [batch] and its log-probability [batch]: drawn by ``choose_tokens`` under the
    sampling distribution, or, where ``forced`` [batch] holds a token id (>= 0; -1 elsewhere, or None for
    no row), that token with the model's own log-probability (the engine writes it, the model does not
    choose it). A pure function of tensors, so the engine runs it inside its compiled decode step."""
    logprobs = sampling_logprobs(logits, params)
    tokens = choose_tokens(logprobs, params, draws)
    if forced is not None:
        tokens = torch.where(forced >= 0, forced, tokens)
        own = logprobs if params.temperature == 0 else torch.log_softmax(logits.float(), dim=-1)
        logprobs = torch.where(forced[:, None] >= 0, own, logprobs)
    return tokens, logprobs.gather(1, tokens[:, None])[:, 0]
