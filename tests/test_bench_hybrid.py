"""The hybrid benchmark compares like with like: same depth and width, about the same parameter count."""

from __future__ import annotations

import pytest

from bench.bench_hybrid import configs, parameters, twin_pattern


def test_twin_swaps_every_mamba_layer_for_attention():
    assert twin_pattern("M-M*-M-") == "*-**-*-"


@pytest.mark.parametrize("full", [False, True])
def test_twin_has_the_hybrids_parameter_count(full):
    pair = configs("nemotron-h-8b", full)
    hybrid, twin = pair["hybrid"], pair["transformer"]
    assert twin["hybrid_override_pattern"].count("*") == hybrid["hybrid_override_pattern"].count("M") + 4
    assert twin["hidden_size"] == hybrid["hidden_size"]
    assert abs(parameters(twin) - parameters(hybrid)) / parameters(hybrid) < 1e-3
