"""Piecewise CUDA graphs for the rollout engine's decode step.

A decode step is hundreds of small kernels (a handful per layer); at small batch their launch overhead,
not memory bandwidth, bounds it. A CUDA graph replays a recorded run of kernels with one launch. The
attention layers change shape every step (the KV span they read grows), so the step is cut at them:
each stretch of Mamba and MLP layers between attention layers (the first also embeds the tokens, the
last also computes the logits) is recorded once per batch bucket and replayed, and the attention layers
run eagerly in between, as in vLLM's piecewise graphs.

A batch of n sequences runs in the smallest bucket >= n. Its padding rows n..bucket-1 are free slots
(the running sequences hold slots 0..n-1): their states are scratch until a prompt is admitted there,
and prefill overwrites a slot's conv and SSM states and every KV position the slot will read. A padding
row feeds token 0 at position 0 and sees only that position, so it stays finite.

Recording runs each stretch once for real (to warm up Triton's autotuning), which writes the states of
the bucket's slots: so every bucket is recorded while no sequence is running, right after the engine
allocates its cache. With ``capture=False`` the same padded stretches run eagerly: the CPU twin of the
graphs, which the tests hold equal to the plain decode step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from rollout.engine import RolloutEngine


def bucket_sizes(max_batch: int) -> list[int]:
    """Batch sizes with a recorded graph: powers of two below ``max_batch``, then ``max_batch`` itself."""
    sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    return sizes + [max_batch]


@dataclass(frozen=True)
class Stretch:
    """Consecutive layers without attention; ``embed``: starts from token ids, ``logits``: ends in logits."""

    layers: tuple[int, ...]
    embed: bool
    logits: bool


def plan(is_attention: list[bool]) -> list[Stretch | int]:
    """The decode step as stretches to replay and attention layer indices to run eagerly, in order."""
    steps: list[Stretch | int] = []
    current: list[int] = []
    for i, attention in enumerate(is_attention):
        if attention:
            if current or not steps:     # two attention layers in a row have nothing to replay between them
                steps.append(Stretch(tuple(current), embed=not steps, logits=False))
            steps.append(i)
            current = []
        else:
            current.append(i)
    return steps + [Stretch(tuple(current), embed=not steps, logits=True)]


class _Graph:
    """One stretch at one batch size, recorded once and replayed on a fixed input buffer."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, pool: tuple) -> None:
        self.input = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm-up outside the recording: autotuning and lazy allocations
            run(self.input)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = run(self.input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.input.copy_(x)
        self.graph.replay()
        return self.output


class PiecewiseDecode:
    """The engine's decode step, padded to a batch bucket, with its attention-free stretches replayed as
    CUDA graphs (``capture=True``) or run eagerly (``capture=False``)."""

    def __init__(self, engine: RolloutEngine, is_attention: list[bool], capture: bool = True) -> None:
        if capture and engine.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the engine is on {engine.device}")
        self.engine, self.capture = engine, capture
        self.steps = plan(is_attention)
        self.buckets = bucket_sizes(engine.max_batch)
        self.graphs: dict[tuple[int, int], _Graph] = {}     # (bucket, step index) -> graph

    def record(self) -> None:
        """Record every stretch at every bucket, largest first so smaller ones reuse its memory; call
        while no sequence is running (see the module docstring)."""
        if not self.capture or self.graphs:
            return
        engine, pool = self.engine, torch.cuda.graph_pool_handle()
        hidden_size = engine.model.config.hidden_size
        dtype = next(engine.model.parameters()).dtype
        with torch.no_grad():
            for size in reversed(self.buckets):
                for index, step in enumerate(self.steps):
                    if isinstance(step, Stretch):
                        example = (torch.zeros(size, dtype=torch.long, device=engine.device) if step.embed
                                   else torch.zeros(size, hidden_size, dtype=dtype, device=engine.device))
                        self.graphs[size, index] = _Graph(lambda x, s=step: self._stretch(x, s), example, pool)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Same contract as ``RolloutEngine._decode_step``: logits [batch, vocab] for one token per sequence
        (a copy: the graph's own output buffer is overwritten by the next step)."""
        n = tokens.shape[0]
        size = next(b for b in self.buckets if b >= n)
        pad = size - n
        tokens, positions = F.pad(tokens, (0, pad)), F.pad(positions, (0, pad))
        bias = torch.cat([bias, bias.new_full((pad, bias.shape[1]), float("-inf"))])
        bias[n:, 0] = 0
        x = tokens
        for index, step in enumerate(self.steps):
            if isinstance(step, Stretch):
                x = self.graphs[size, index](x) if self.capture else self._stretch(x, step)
            else:
                x = self.engine._layers(x, None, lambda i, attn, h: self.engine._attention_step(
                    i, attn, h, positions, bias), layers=[step])
        return x[:n].clone() if self.capture else x[:n]

    def _stretch(self, x: torch.Tensor, stretch: Stretch) -> torch.Tensor:
        engine = self.engine
        hidden = engine.model.model.embeddings(x) if stretch.embed else x
        hidden = engine._layers(hidden, engine._mamba_step, None, layers=stretch.layers)
        return engine._logits(hidden) if stretch.logits else hidden
