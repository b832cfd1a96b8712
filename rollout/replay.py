"""The compiled decode step called again without Dynamo.

Every call of a ``torch.compile``d function first runs Dynamo: a cache lookup, the guards, and bytecode
that fetches each of the graph's inputs (the tiny model's step takes 66 tensors: weights, cache buffers,
tokens) before the compiled graph runs. On a 2-core CPU that is 120-220 us per decode step, a tenth of a
step at batch 64 and more than a third at batch 1. From step to step of one ``generate()`` call, at one
batch size, only the tokens and the step's rows of the sampling draws change; the weights, the cache and
the sampling settings are the same, the tensors updated in place. So the first step at each batch size goes
through ``torch.compile`` (guards checked, the graph chosen or compiled) and the later ones call that graph
directly with the new tensors swapped into its arguments: on CPU, what replaying a CUDA graph is on a GPU.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch._inductor.compile_fx import compile_fx


class Replay:
    """A ``torch.compile`` backend: Inductor (with ``options`` as its config), remembering each graph that
    ran since the last ``again``, with the arguments Dynamo passed it and its results."""

    def __init__(self, options: dict[str, Any]):
        self.options = options
        self._calls: list[tuple[Callable[..., Any], tuple[Any, ...], Sequence[Any]]] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled = compile_fx(graph, example_inputs, config_patches=self.options)

        def run(*args: Any) -> Any:
            outputs = compiled(*args)
            self._calls.append((compiled, args, outputs))
            return outputs

        return run

    def again(self, inputs: Sequence[torch.Tensor | None],
              outputs: Sequence[torch.Tensor]) -> Callable[..., tuple[torch.Tensor, ...]] | None:
        """After a call through ``torch.compile`` that took ``inputs`` (the tensors that change from call
        to call; None for an absent one) and returned ``outputs``: a function of new such inputs, in the
        same places and of the same shapes, dtypes and strides (the sizes Dynamo passed the graph are
        reused, and no guard is checked), that runs the same graph on them and returns its new outputs.
        None unless the call ran
        exactly one graph of this backend (a graph break splits a call into several, and replaying the
        last alone would skip the others) whose arguments and results hold those inputs and outputs one
        for one; the caller then goes through ``torch.compile`` again."""
        calls, self._calls = self._calls, []
        if len(calls) != 1:
            return None
        (compiled, args, results), = calls
        where = [[i for i, a in enumerate(args) if a is t] for t in inputs if t is not None]
        picks = [[k for k, r in enumerate(results) if r is t] for t in outputs]
        if any(len(found) != 1 for found in where + picks):
            return None

        def run(*new: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
            swapped = list(args)
            for (i,), t in zip(where, (t for t in new if t is not None)):
                swapped[i] = t
            results = compiled(*swapped)
            return tuple(results[k] for (k,) in picks)

        return run
