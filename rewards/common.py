"""Text helpers shared by the reward functions.

TRL hands a reward function the completions either as strings or in conversational form, and passes
every dataset column as a list with one entry per completion. These helpers turn both into plain
strings and per-row values once, so each reward only implements its own check.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

RewardFn = Callable[..., list[float | None]]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def message_text(message: Any) -> str:
    """The text of a string, a message dict, or a list of message dicts (the last one counts).

    A conversational completion ends with the assistant turn being scored, hence the last message.
    Content given as a list of typed parts keeps only its text parts. Anything else yields "", so a
    malformed completion scores as an empty answer instead of raising inside the trainer.
    """
    if isinstance(message, str):
        return message
    if isinstance(message, Sequence) and message:
        return message_text(message[-1])
    if isinstance(message, dict):
        content = message.get("content", "")
        if isinstance(content, str):
            return content
        if isinstance(content, Sequence):
            return "".join(
                part.get("text", "") if isinstance(part, dict) else str(part) for part in content
            )
    return ""


def prompt_text(prompt: Any) -> str:
    """All text of a prompt (a string or a list of messages), used to spot answers copied from it."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        return "\n".join(message_text(message) for message in prompt)
    return message_text(prompt)


def answer_text(completion: Any) -> str:
    """The answer part of a completion: the text after the last ``</think>``.

    Without any ``</think>`` the whole text is the answer: the content rewards then still score a
    reply from a model run without a think block, and ``format_reward`` is the one that penalises
    missing tags.
    """
    text = message_text(completion)
    return text.rsplit(THINK_CLOSE, 1)[-1]


_BOX_OR_BRACE = re.compile(r"\\boxed\s*\{|[{}]")


def boxed_contents(text: str) -> list[str]:
    r"""The contents of every outermost ``\boxed{...}`` in ``text``, in order, with nested braces matched.

    A regex cannot match nested braces (``\boxed{\frac{1}{2}}``), so one pass keeps a stack of open
    braces: that is linear in the text, where rescanning from every ``\boxed{`` would be quadratic on
    a completion full of unclosed boxes. A box inside a closed box is part of the outer box's
    contents, which keeps the returned text no longer than ``text``; an unclosed box at the end (a
    truncated completion) is dropped.
    """
    spans: list[tuple[int, int]] = []
    opened: list[int | None] = []  # per open brace: where its box's contents start, None if no box
    for match in _BOX_OR_BRACE.finditer(text):
        if match.group() != "}":
            opened.append(None if match.group() == "{" else match.end())
        elif opened and (start := opened.pop()) is not None:
            spans.append((start, match.start()))
    contents: list[str] = []
    end = -1
    for start, stop in sorted(spans):
        if start > end:  # not inside the last kept box
            contents.append(text[start:stop])
            end = stop
    return contents


def column(values: Sequence[Any] | None, size: int, name: str) -> list[Any]:
    """A per-completion column as a list of ``size`` entries; a missing column is all ``None``.

    A length mismatch is a wiring bug in the caller, not a property of a completion, so it raises.
    """
    if values is None:
        return [None] * size
    values = list(values)
    if len(values) != size:
        raise ValueError(f"column {name!r} has {len(values)} entries for {size} completions")
    return values


def applies(source: Any, wanted: str) -> bool:
    """Whether a row belongs to the reward's source; rows without a source column always do.

    In a blended GRPO dataset TRL calls every reward on every row, and a reward answers ``None`` for
    rows of other sources so they do not count as wrong.
    """
    return source is None or source == "" or source == wanted
