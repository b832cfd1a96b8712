"""The rollout engine's decode step as CUDA graphs.

A decode step is hundreds of small kernels (a handful per layer) and the choice of the next tokens; at small
batch their launches, not memory bandwidth, bound it. A CUDA graph replays a recorded run of kernels with one
launch. Every kernel of the step has the same shapes at every step of a generation (the attention reads each
row's position on the device, ``kernels.decode_attention``), so the whole step, token choice included, is one
graph per batch bucket and sampling setting.

A batch of n sequences runs in the smallest bucket >= n. Its padding rows n..bucket-1 are free slots (the
running sequences hold slots 0..n-1): their states are scratch until a prompt is admitted there, and prefill
overwrites a slot's conv and SSM states and every KV position the slot will read. A padding row feeds token 0
at position 0 and reads only that position, so it stays finite.

Recording runs no kernel, so a graph is recorded at the first step that needs it, right after that step runs
for real on the same buffers (which also compiles the Triton kernels and lets cuBLAS allocate its workspace
outside the recording). With ``capture=False`` the same padded step runs eagerly: the CPU twin of the graphs,
which the tests hold equal to the plain step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from rollout.sampling import SamplingParams, pick

if TYPE_CHECKING:
    from rollout.engine import RolloutEngine

Inputs = list[torch.Tensor | None]     # tokens, draws, forced, positions: [bucket] each, or None where absent


def bucket_sizes(max_batch: int) -> list[int]:
    """Batch sizes with a recorded graph: powers of two below ``max_batch``, then ``max_batch`` itself."""
    sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    return sizes + [max_batch]


def pad_rows(tokens: torch.Tensor, draws: torch.Tensor | None, forced: torch.Tensor | None, positions: torch.Tensor,
             size: int) -> Inputs:
    """A step's inputs padded to ``size`` rows: token 0 at position 0, draw 0, nothing forced."""
    pad = (0, size - tokens.shape[0])
    return [F.pad(tokens, pad), None if draws is None else F.pad(draws, pad),
            None if forced is None else F.pad(forced, pad, value=-1), F.pad(positions, pad)]


class _Graph:
    """One padded step recorded as a CUDA graph over its own input buffers."""

    def __init__(self, run: Callable[..., tuple[torch.Tensor, torch.Tensor]], inputs: Inputs, pool: tuple) -> None:
        """Records ``run`` on copies of ``inputs``. Recording runs nothing: the caller has run the step for real."""
        self.inputs = [None if t is None else t.clone() for t in inputs]
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = run(*self.inputs)

    def __call__(self, inputs: Inputs) -> tuple[torch.Tensor, ...]:
        for buffer, t in zip(self.inputs, inputs):
            if buffer is not None:
                buffer.copy_(t)
        self.graph.replay()
        return self.outputs


class DecodeGraphs:
    """``RolloutEngine._decode_and_pick``, padded to a batch bucket, replayed as one CUDA graph per (bucket,
    sampling setting) (``capture=True``) or run eagerly on the padded inputs (``capture=False``)."""

    def __init__(self, engine: RolloutEngine, capture: bool = True) -> None:
        if capture and engine.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the engine is on {engine.device}")
        self.engine, self.capture = engine, capture
        self.buckets = bucket_sizes(engine.max_batch)
        self.graphs: dict[tuple, _Graph] = {}
        # Graphs share one memory pool: one replays at a time, and its outputs are copied out before the next.
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def __call__(self, tokens: torch.Tensor, draws: torch.Tensor | None, forced: torch.Tensor | None,
                 positions: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as ``RolloutEngine._decode_and_pick``: each row's next token and its log-probability."""
        n = tokens.shape[0]
        size = next(b for b in self.buckets if b >= n)
        inputs = pad_rows(tokens, draws, forced, positions, size)

        def run(tokens: torch.Tensor, draws: torch.Tensor | None, forced: torch.Tensor | None,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return pick(self.engine._decode_step(tokens, positions), params, draws, forced)

        if not self.capture:
            return tuple(t[:n] for t in run(*inputs))
        # The sampling settings a graph bakes in (temperature 0: no draws), and whether it reads forced tokens.
        key = (size, params.temperature, params.top_k, params.top_p, forced is None)
        graph = self.graphs.get(key)
        if graph is not None:
            return tuple(t[:n].clone() for t in graph(inputs))
        side = torch.cuda.Stream()     # the step for real, outside any recording (as torch.cuda.graph asks)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = run(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graphs[key] = _Graph(run, inputs, self.pool)
        return tuple(t[:n] for t in outputs)
