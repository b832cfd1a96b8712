"""Named NemotronH layouts.

A layout is the set of ``NemotronHConfig`` keyword arguments that fixes the architecture. The pattern
string uses Nemotron-H's own letters: ``M`` Mamba-2, ``-`` MLP, ``*`` attention. The two full-size
layouts follow the published checkpoints (8.10B and 8.89B parameters with their 131,072-token
vocabulary) and are used with random weights for sizing and benchmarks; training loads real weights by
path or hub name instead.
"""

from __future__ import annotations

from typing import Any

LAYOUTS: dict[str, dict[str, Any]] = {
    # ~0.5M parameters: small enough that the whole `tiny` pipeline runs on two CPU cores.
    "tiny": dict(
        hybrid_override_pattern="M*M*M*-",
        hidden_size=96,
        intermediate_size=288,
        mamba_num_heads=8,
        mamba_head_dim=24,
        n_groups=1,
        ssm_state_size=16,
        conv_kernel=4,
        chunk_size=16,  # the PyTorch scan of training: 16-token chunks are a quarter faster than 64 here
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=1024,
        vocab_size=512,
    ),
    "nemotron-h-8b": dict(
        hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        hidden_size=4096,
        intermediate_size=21504,
        mamba_num_heads=128,
        mamba_head_dim=64,
        n_groups=8,
        ssm_state_size=128,
        conv_kernel=4,
        chunk_size=128,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        vocab_size=131072,
    ),
    "nemotron-nano-9b-v2": dict(
        hybrid_override_pattern="M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
        hidden_size=4480,
        intermediate_size=15680,
        mamba_num_heads=128,
        mamba_head_dim=80,
        n_groups=8,
        ssm_state_size=128,
        conv_kernel=4,
        chunk_size=128,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        vocab_size=131072,
    ),
}


def layout(name: str) -> dict[str, Any]:
    """Return a copy of a named layout; unknown names list the known ones."""
    if name not in LAYOUTS:
        raise KeyError(f"unknown model layout {name!r}; known: {sorted(LAYOUTS)}")
    return dict(LAYOUTS[name])


def reduced(name: str, hidden_size: int = 64) -> dict[str, Any]:
    """A named layout at reduced width: the same layer pattern, sizes scaled for CPU tests and benches."""
    return layout(name) | dict(
        hidden_size=hidden_size, intermediate_size=4 * hidden_size, mamba_num_heads=8,
        mamba_head_dim=hidden_size // 4, n_groups=2, ssm_state_size=16, chunk_size=32,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4, vocab_size=512,
    )
