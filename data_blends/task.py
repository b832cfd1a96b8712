"""The one row form every loader and generator produces.

Loaders (hub datasets, jsonl, parquet) and the embedded generators all yield ``TaskRow``s, so the chat
formatter, the evaluators and the rewards read one schema. Every key is always present (empty when it
does not apply) so a list of rows becomes an Arrow table without per-source columns.
"""

from __future__ import annotations

from typing import TypedDict

SOURCES = ("math", "science", "code", "ifeval", "safety", "chat")


class TaskRow(TypedDict):
    id: str  # unique within a source and split, e.g. "math-train-000017"
    source: str  # one of SOURCES
    system: str  # extra system text (the /think or /no_think tag is added by the formatter)
    context: list[dict[str, str]]  # earlier turns [{"role": "user"|"assistant", "content": ...}], usually []
    prompt: str  # the last user message
    thinking: str  # reasoning trace, without <think> tags; "" when the row has none
    answer: str  # the final reply the assistant gives after </think>
    gold: str  # math/science: reference answer; safety: "refuse" or "comply"; else ""
    steps: int  # generated math: columns of arithmetic the reference works through (1: one fact); else 0
    tests: list[str]  # code: Python assert statements run against the answer's code; else []
    constraints: list[str]  # ifeval: checkable constraints such as "lowercase" or "max_words:8"; else []


def make_row(**fields: object) -> TaskRow:
    """Fill the keys a source does not use with their empty value, and reject unknown keys."""
    empty: dict[str, object] = {
        "id": "", "source": "", "system": "", "context": [], "prompt": "", "thinking": "",
        "answer": "", "gold": "", "steps": 0, "tests": [], "constraints": [],
    }
    unknown = set(fields) - set(empty)
    if unknown:
        raise KeyError(f"unknown TaskRow fields: {sorted(unknown)}")
    return TaskRow(**(empty | fields))  # type: ignore[typeddict-item]
