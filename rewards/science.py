r"""Science reward: multiple-choice letters compared directly, numeric answers verified like math.

Science sets mix lettered choices (GPQA, MMLU style) with numeric answers, told apart by the gold:
a single letter A-J is a choice, anything else goes through the math verification.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rewards.common import answer_text, applies, boxed_contents, column
from rewards.math import DEFAULT_TIMEOUT, score_math

_LETTER = re.compile(r"^[A-J]$")
_BOX_LETTER = re.compile(r"^\(?([A-J])\)?$")
# "The answer is (B)", "Answer: **B**"; the letter itself must be a capital, or "the answer is a
# ..." would read as choice A. The gap is one possessive run of spaces, colons and asterisks: as
# separate optional runs ("\s*:?\s*\**\s*") a long run of spaces backtracked in cubic time.
_STATED = re.compile(r"(?i:answer\s*(?:is|:))[\s:*]*+\(?([A-J])\)?(?!\w)")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def choice_letter(gold: str) -> str | None:
    """The gold's choice letter ("B", "(B)"), or None when the gold is not a multiple-choice letter."""
    gold = gold.strip().strip("()").strip()
    return gold if _LETTER.match(gold) else None


def predicted_letter(answer: str) -> str | None:
    r"""The letter the answer commits to: its last ``\boxed{}``, else its last "The answer is X".

    Boxes that name different letters hedge, so they give no letter; a box that holds something
    other than a letter gives none either (the box is the answer when there is one).
    """
    boxes = [_TEXT_WRAPPER.sub(r"\1", box).replace(" ", "") for box in set(boxed_contents(answer))]
    if boxes:
        letters = {match.group(1) if (match := _BOX_LETTER.match(box)) else None for box in boxes}
        return letters.pop() if len(letters) == 1 else None
    stated = _STATED.findall(answer)
    return stated[-1] if stated else None


def science_reward(prompts: Sequence[Any], completions: Sequence[Any], gold: Sequence[str], *,
                   timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> list[float | None]:
    """1.0 for the right choice letter or an equal number, else 0.0; ``None`` when not scored.

    ``None`` marks rows of another ``source`` or without gold, and numeric verifications that ran
    past ``timeout`` seconds.
    """
    size = len(completions)
    golds = column(gold, size, "gold")
    sources = column(kwargs.get("source"), size, "source")
    prompts = column(prompts, size, "prompts")
    scores: list[float | None] = [None] * size
    numeric: list[int] = []
    for index in range(size):
        if not applies(sources[index], "science") or not golds[index] or not golds[index].strip():
            continue
        letter = choice_letter(golds[index])
        if letter is None:
            numeric.append(index)
        else:
            scores[index] = float(predicted_letter(answer_text(completions[index])) == letter)
    verdicts = score_math([prompts[i] for i in numeric],
                          [answer_text(completions[i]) for i in numeric],
                          [golds[i] for i in numeric], timeout)
    for index, verdict in zip(numeric, verdicts):
        scores[index] = verdict
    return scores
