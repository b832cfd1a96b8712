"""rollout.replay: a compiled graph called again on new inputs, and no replay where a call does not map onto it."""

from __future__ import annotations

import torch

from rollout.replay import Replay


def test_replay_runs_the_same_graph_on_new_inputs_and_sees_weights_updated_in_place():
    replay = Replay({})
    weight = torch.randn(4, 4)

    def step(x: torch.Tensor, bias: torch.Tensor, unused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x @ weight).relu() + bias, x.sum(-1)

    compiled = torch.compile(step, backend=replay, dynamic=True)
    x, bias, unused = torch.randn(3, 4), torch.randn(4), torch.randn(2)
    again = replay.again((x, bias), compiled(x, bias, unused))
    assert again is not None
    for _ in range(2):
        x, bias = torch.randn(3, 4), torch.randn(4)
        for got, want in zip(again(x, bias), step(x, bias, unused)):
            torch.testing.assert_close(got, want)
        weight.add_(1.0)         # the graph reads the same tensor, as the engine's step reads its weights


def test_replay_declines_inputs_and_outputs_that_are_not_the_graphs_own():
    replay = Replay({})
    compiled = torch.compile(lambda x, unused: (x * 2, x.sum()), backend=replay, dynamic=True)
    x, unused = torch.randn(5), torch.randn(5)
    assert replay.again((x, unused), compiled(x, unused)) is None       # `unused` is no argument of the graph
    doubled, total = compiled(x, unused)
    assert replay.again((x,), (doubled, x)) is None                      # `x` is no result of it
    assert replay.again((x,), (doubled, total)) is None                  # each call is replayed once at most
    doubled, total = compiled(x, unused)
    assert replay.again((x, None), (doubled, total)) is not None         # an absent input is skipped


def test_replay_declines_a_call_split_by_a_graph_break():
    replay = Replay({})

    def step(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        torch._dynamo.graph_break()
        return y + x         # the second graph takes x too: replaying it alone would skip the first

    compiled = torch.compile(step, backend=replay, dynamic=True)
    x = torch.randn(5)
    assert replay.again((x,), (compiled(x),)) is None
