"""Format reward: the completion is ``[<think>]reasoning</think>answer`` with a non-empty answer.

The content rewards read only the text after the last ``</think>``; this reward is the one that
holds the model to the tag structure, including an empty think block when reasoning is off
(``/no_think``). The opening ``<think>`` may be missing because chat templates often put it in the
prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rewards.common import THINK_CLOSE, THINK_OPEN, column, message_text


def reasoning_on(flag: Any) -> bool | None:
    """A ``reasoning`` column entry as a bool: True/"on", False/"off", None (or anything else) unknown."""
    if isinstance(flag, bool):
        return flag
    if isinstance(flag, str) and flag.strip().lower() in ("on", "off"):
        return flag.strip().lower() == "on"
    return None


def well_formed(text: str, reasoning: bool | None = None) -> bool:
    """Exactly one ``</think>``, at most one ``<think>`` opening the text, and a non-empty answer.

    Text before a ``<think>`` is rejected as well: the think block must open the completion. With
    ``reasoning`` False the think block must also be empty (whitespace only).
    """
    if text.count(THINK_CLOSE) != 1 or text.count(THINK_OPEN) > 1:
        return False
    thinking, answer = text.split(THINK_CLOSE)
    if THINK_OPEN in thinking:
        before, thinking = thinking.split(THINK_OPEN)
        if before.strip():
            return False
    if THINK_OPEN in answer or not answer.strip():
        return False
    return reasoning is not False or not thinking.strip()


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 for a well-formed completion, else 0.0; scores every row whatever its source.

    The optional ``reasoning`` column (bool or "on"/"off" per row) enforces an empty think block on
    rows generated with reasoning off.
    """
    flags = column(kwargs.get("reasoning"), len(completions), "reasoning")
    return [float(well_formed(message_text(c), reasoning_on(f))) for c, f in zip(completions, flags)]
