"""The named layouts are the published architectures."""

from __future__ import annotations

import pytest
import torch

from model.factory import build_model


@pytest.mark.parametrize("name, billions", [("nemotron-h-8b", 8.10), ("nemotron-nano-9b-v2", 8.89)])
def test_full_size_layouts_have_the_published_parameter_counts(name, billions):
    """Built on the meta device: the shapes of 8 billion parameters without drawing their values."""
    model = build_model(name, dtype=torch.bfloat16, device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
