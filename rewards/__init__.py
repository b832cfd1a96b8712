"""Verifiable reward functions with TRL's signature, and a registry so configs can name them.

Every reward is ``fn(prompts, completions, **columns) -> list[float | None]``: one value per
completion, ``None`` where it could not be scored (another source's row, a timeout, a sandbox
failure) so that it is not counted as wrong.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from rewards.code import code_reward
from rewards.common import RewardFn
from rewards.format import format_reward
from rewards.ifeval import ifeval_reward
from rewards.math import math_reward
from rewards.safety import safety_reward
from rewards.science import science_reward

REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "science": science_reward,
    "code": code_reward,
    "ifeval": ifeval_reward,
    "safety": safety_reward,
    "format": format_reward,
}


def get_reward(name: str, **options: Any) -> RewardFn:
    """The reward registered as ``name``, with keyword ``options`` bound (e.g. ``timeout=2.0``).

    The result keeps the reward's ``__name__``, which TRL uses to label the reward in its logs.
    """
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; known rewards: {sorted(REWARDS)}")
    reward = REWARDS[name]
    if not options:
        return reward
    return functools.update_wrapper(functools.partial(reward, **options), reward)


def weighted_sum(rewards: Sequence[Sequence[float | None]], weights: Sequence[float]) -> list[float | None]:
    """Per completion, ``sum(weight * reward)``; ``None`` where any component is ``None``.

    A missing component means the total is unknown, so it is not silently treated as 0.
    """
    if len(rewards) != len(weights):
        raise ValueError(f"{len(rewards)} reward lists but {len(weights)} weights")
    if not rewards:
        return []
    size = len(rewards[0])
    if any(len(values) != size for values in rewards):
        raise ValueError(f"reward lists differ in length: {[len(values) for values in rewards]}")
    totals: list[float | None] = []
    for column in zip(*rewards):
        if any(value is None for value in column):
            totals.append(None)
        else:
            totals.append(sum(weight * value for weight, value in zip(weights, column)))
    return totals


def summarize(values: Sequence[float | None]) -> dict[str, float]:
    """Mean of the scored values, share of ``None`` ("unscorable") and count, for logging a reward.

    ``None`` is kept apart from 0: averaged in as 0, a verifier timeout or a sandbox failure would
    read as a worse policy. The mean of nothing scored is NaN.
    """
    scored = [value for value in values if value is not None]
    return {
        "mean": sum(scored) / len(scored) if scored else float("nan"),
        "unscorable": (len(values) - len(scored)) / len(values) if values else 0.0,
        "n": len(values),
    }


__all__ = [
    "REWARDS", "RewardFn", "code_reward", "format_reward", "get_reward", "ifeval_reward",
    "math_reward", "safety_reward", "science_reward", "summarize", "weighted_sum",
]
