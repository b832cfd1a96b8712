r"""Math reward: the last ``\boxed{}`` of the answer checked against the gold answer with math-verify.

Only the boxed answer is parsed, because math-verify's free-text extraction would otherwise pick up
numbers from the working. Verification runs in worker processes with a hard deadline (see
``rewards.workers``), so a pathological expression costs at most the deadline and scores ``None``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from rewards.common import answer_text, applies, boxed_contents, column, prompt_text
from rewards.workers import shared_pool

DEFAULT_TIMEOUT = 5.0
POOL_SIZE = min(4, os.cpu_count() or 1)

# A binary operator is one directly preceded by an operand, so "-5" or "(-5)" has none but
# "123+456", "2\times3" and "x^2+1" do.
_BINARY_OPERATOR = re.compile(r"(?<=[\w})\].!])(?:[+\-*/^]|\\times|\\cdot|\\div)")
_NOISE = re.compile(r"\s+|\\left|\\right|\\!|\\,|\\;|\\:|\$")


def normalize(expression: str) -> str:
    """Whitespace- and spacing-command-free text, so two spellings of one box compare equal."""
    return _NOISE.sub("", expression).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def restates_question(boxed: str, prompt: str, gold: str) -> bool:
    r"""Whether a boxed answer is a compound expression copied verbatim from the question.

    ``\boxed{123+456}`` for "What is 123+456?" verifies as equal to 579, yet it is the question, not
    an answer. The rule: the normalized box contains a binary operator, occurs verbatim in the
    normalized prompt, and is not itself the gold answer's text. Plain numbers and symbols are never
    caught (an answer may legitimately repeat a number from the question), and neither are
    ``\frac{}{}`` or ``\sqrt{}`` alone, which are canonical answer forms.
    """
    text = normalize(boxed)
    return (
        _BINARY_OPERATOR.search(text) is not None
        and text in normalize(prompt)
        and text != normalize(strip_gold(gold))
    )


def strip_gold(gold: str) -> str:
    r"""The gold answer without surrounding ``$`` or a ``\boxed{}`` wrapper."""
    gold = gold.strip().strip("$").strip()
    boxes = boxed_contents(gold)
    return boxes[-1] if boxes else gold


def verify_boxed(gold: str, boxed: str, timeout: int) -> bool:
    """Runs in a worker: math-verify's ``verify(parse(gold), parse(answer))``, gold parsed first.

    Both sides are re-wrapped in ``\\boxed{}`` so that math-verify reads them as LaTeX answers; its
    own signal-based timeouts work here because a worker runs this in its main thread.
    """
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{strip_gold(gold)}}}", parsing_timeout=timeout)
    answer_parsed = parse(f"\\boxed{{{boxed}}}", parsing_timeout=timeout)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))


def final_box(answer: str) -> str | None:
    """The last boxed expression, or None when there is none or the boxes disagree.

    Several different boxed answers hedge between candidates, so they are not accepted even if the
    last one is right; repeating one answer in several boxes is fine.
    """
    boxes = [box for box in boxed_contents(answer) if box.strip()]
    if not boxes or len({normalize(box) for box in set(boxes)}) > 1:  # a repeated box is normalized once
        return None
    return boxes[-1]


def verify_many(pairs: Sequence[tuple[str, str]], timeout: float) -> list[bool | None]:
    """Verify ``(gold, boxed)`` pairs in the shared worker pool, ``None`` where a worker timed out."""
    pool = shared_pool(POOL_SIZE, "math_verify")
    inner_timeout = max(1, int(timeout))
    return pool.map(verify_boxed, [(gold, boxed, inner_timeout) for gold, boxed in pairs], timeout)


def score_math(prompts: Sequence[Any], answers: Sequence[str], golds: Sequence[str],
               timeout: float) -> list[float | None]:
    """1.0/0.0 per answer (``None`` on timeout); shared by the math and the numeric science reward."""
    scores: list[float | None] = [0.0] * len(answers)
    todo: list[int] = []
    pairs: list[tuple[str, str]] = []
    for index, (prompt, answer, gold) in enumerate(zip(prompts, answers, golds)):
        boxed = final_box(answer)
        if boxed is not None and not restates_question(boxed, prompt_text(prompt), gold):
            todo.append(index)
            pairs.append((gold, boxed))
    for index, verdict in zip(todo, verify_many(pairs, timeout)):
        scores[index] = None if verdict is None else float(verdict)
    return scores


def math_reward(prompts: Sequence[Any], completions: Sequence[Any], gold: Sequence[str], *,
                timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> list[float | None]:
    """1.0 when the answer's last ``\\boxed{}`` equals ``gold``, else 0.0; ``None`` when not scored.

    ``None`` marks rows of another ``source`` or without gold, and verifications that ran past
    ``timeout`` seconds.
    """
    size = len(completions)
    golds = column(gold, size, "gold")
    sources = column(kwargs.get("source"), size, "source")
    prompts = column(prompts, size, "prompts")
    rows = [i for i in range(size) if applies(sources[i], "math") and golds[i] and golds[i].strip()]
    scores: list[float | None] = [None] * size
    scored = score_math([prompts[i] for i in rows], [answer_text(completions[i]) for i in rows],
                        [golds[i] for i in rows], timeout)
    for index, score in zip(rows, scored):
        scores[index] = score
    return scores
