"""Instruction-following reward: checkable constraints such as "lowercase" or "max_words:8".

Each constraint string is ``name`` or ``name:argument`` and maps to one small checker. The default
score is the strict IFEval prompt-level metric (every constraint holds); ``strict=False`` gives the
fraction of constraints that hold. An empty answer scores 0.0 even though it would vacuously satisfy
constraints like "lowercase" or "max_words:8", which would otherwise reward saying nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from rewards.common import answer_text, applies, column

_WORD = re.compile(r"\w+(?:['’-]\w+)*")


def count_words(text: str) -> int:
    """Words as runs of letters/digits, with inner apostrophes and hyphens ("don't", "well-known")."""
    return len(_WORD.findall(text))


def contains_word(text: str, word: str) -> bool:
    """Case-insensitive match of ``word`` not glued to other word characters ("cat" is not in "category")."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def _unquoted(text: str) -> str:
    """Start/end checks look through surrounding quotes, so "quoted" and "end_with" can combine."""
    return text.strip().strip('"').strip().lower()


def _count(argument: str | None) -> int:
    if argument is None or not argument.strip().isdigit():
        raise ValueError(f"expected a non-negative integer, got {argument!r}")
    return int(argument)


def _text(argument: str | None) -> str:
    if argument is None or not argument.strip():
        raise ValueError("expected a non-empty argument")
    return argument.strip()


def _no_argument(argument: str | None) -> None:
    if argument is not None:
        raise ValueError(f"takes no argument, got {argument!r}")


# name -> (argument parser, checker(answer, parsed argument))
CHECKS: dict[str, tuple[Callable[[Any], Any], Callable[[str, Any], bool]]] = {
    "lowercase": (_no_argument, lambda text, _: text == text.lower()),
    "uppercase": (_no_argument, lambda text, _: text == text.upper()),
    "max_words": (_count, lambda text, n: count_words(text) <= n),
    "min_words": (_count, lambda text, n: count_words(text) >= n),
    "include": (_text, contains_word),
    "exclude": (_text, lambda text, word: not contains_word(text, word)),
    "end_with": (_text, lambda text, phrase: _unquoted(text).endswith(phrase.lower())),
    "start_with": (_text, lambda text, phrase: _unquoted(text).startswith(phrase.lower())),
    "quoted": (_no_argument, lambda text, _: len(s := text.strip()) >= 2 and s[0] == s[-1] == '"'),
    "lines": (_count, lambda text, n: sum(1 for line in text.splitlines() if line.strip()) == n),
}


def check(constraint: str, answer: str) -> bool:
    """Whether ``answer`` satisfies one constraint; an unknown or malformed constraint raises ValueError.

    Bad constraints are a dataset bug, so they fail loudly instead of silently scoring 0.
    """
    name, sep, argument = constraint.partition(":")
    if name not in CHECKS:
        raise ValueError(f"unknown constraint {name!r} in {constraint!r}; known: {sorted(CHECKS)}")
    parse, checker = CHECKS[name]
    try:
        parsed = parse(argument if sep else None)
    except ValueError as error:
        raise ValueError(f"malformed constraint {constraint!r}: {error}") from None
    return checker(answer, parsed)


def ifeval_reward(prompts: Sequence[Any], completions: Sequence[Any],
                  constraints: Sequence[Sequence[str]], *, strict: bool = True,
                  **kwargs: Any) -> list[float | None]:
    """1.0 when every constraint holds (``strict``) or the fraction that hold; ``None`` when not scored.

    ``None`` marks rows of another ``source`` and rows without constraints.
    """
    size = len(completions)
    rows = column(constraints, size, "constraints")
    sources = column(kwargs.get("source"), size, "source")
    scores: list[float | None] = []
    for completion, row, source in zip(completions, rows, sources):
        if not applies(source, "ifeval") or not row:
            scores.append(None)
            continue
        answer = answer_text(completion).strip()
        held = [check(constraint, answer) for constraint in row]
        if not answer:
            scores.append(0.0)
        elif strict:
            scores.append(float(all(held)))
        else:
            scores.append(sum(held) / len(held))
    return scores
