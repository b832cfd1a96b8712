"""Read rows from jsonl, parquet and hub datasets into ``TaskRow``s.

Two public schemas are understood, detected per row:
- Llama-Nemotron post-training SFT rows: ``input`` (messages), ``output`` (with ``<think>`` when
  reasoning is on), ``reasoning`` ("on"/"off"), ``system_prompt`` ("detailed thinking on/off").
- Plain chat rows: ``messages`` ending with an assistant turn (its content may hold ``<think>``).
Rows already in the ``TaskRow`` form (``prompt`` and ``answer``) are read as they are.
A bad row stops the load with a ``DataError`` naming the file, the line (or row) and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from data_blends.task import TaskRow, make_row

_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*(.*)$", re.DOTALL)
_DETAILED_THINKING = re.compile(r"detailed thinking (on|off)\.?", re.IGNORECASE)
_CONTROL_TAGS = re.compile(r"/no_think|/think")


class DataError(ValueError):
    """A malformed data row, with where it is."""


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of an assistant reply; a reply without a think block has no thinking."""
    match = _THINK.match(text)
    if match is None:
        return "", text.strip()
    return match.group(1).strip(), match.group(2).strip()


def _field(row: dict, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in row:
        raise DataError(f"{where}: missing field {name!r}")
    if not isinstance(row[name], kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {name!r} must be {expected}, got {type(row[name]).__name__}")
    return row[name]


def _messages(value: Any, name: str, where: str) -> list[dict[str, str]]:
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: field {name}[{i}] must be a message with string 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}: field {name}[{i}].role: unknown role {message['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _system_text(text: str) -> str:
    """System text minus the reasoning controls, which the formatter sets from the blend."""
    return _CONTROL_TAGS.sub("", _DETAILED_THINKING.sub("", text)).strip()


def from_llama_nemotron(row: dict, source: str, row_id: str, where: str) -> TaskRow:
    turns = _messages(_field(row, "input", list, where), "input", where)
    output = _field(row, "output", str, where)
    reasoning = _field(row, "reasoning", str, where)
    if reasoning not in ("on", "off"):
        raise DataError(f"{where}: field 'reasoning' must be 'on' or 'off', got {reasoning!r}")
    system = _system_text(row.get("system_prompt") or "")
    system_turns = [t["content"] for t in turns if t["role"] == "system"]
    turns = [t for t in turns if t["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise DataError(f"{where}: field 'input' must end with a user message")
    thinking, answer = split_thinking(output)
    if reasoning == "off" and thinking:
        raise DataError(f"{where}: field 'output' has reasoning although 'reasoning' is 'off'")
    return make_row(
        id=row_id, source=source, system="\n".join([*map(_system_text, system_turns), system]).strip(),
        context=turns[:-1], prompt=turns[-1]["content"], thinking=thinking, answer=answer,
    )


def from_messages(row: dict, source: str, row_id: str, where: str) -> TaskRow:
    turns = _messages(_field(row, "messages", list, where), "messages", where)
    system = "\n".join(_system_text(t["content"]) for t in turns if t["role"] == "system").strip()
    turns = [t for t in turns if t["role"] != "system"]
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        raise DataError(f"{where}: field 'messages' must end with a user message and an assistant reply")
    thinking, answer = split_thinking(turns[-1]["content"])
    return make_row(id=row_id, source=source, system=system, context=turns[:-2],
                    prompt=turns[-2]["content"], thinking=thinking, answer=answer)


def from_task_row(row: dict, source: str, row_id: str, where: str) -> TaskRow:
    fields: dict[str, Any] = {"id": row.get("id") or row_id, "source": row.get("source") or source}
    for name, kind in (("system", str), ("prompt", str), ("thinking", str), ("answer", str), ("gold", str)):
        if name in row or name in ("prompt", "answer"):
            fields[name] = _field(row, name, kind, where)
    if "steps" in row:
        fields["steps"] = _field(row, "steps", int, where)
    for name in ("tests", "constraints"):
        if name in row:
            fields[name] = [str(item) for item in _field(row, name, list, where)]
    if "context" in row:
        fields["context"] = _messages(_field(row, "context", list, where), "context", where)
    return make_row(**fields)


def to_task_row(row: Any, source: str, row_id: str, where: str) -> TaskRow:
    """Detect the row's schema and convert it."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "input" in row or "output" in row:
        return from_llama_nemotron(row, source, row_id, where)
    if "messages" in row:
        return from_messages(row, source, row_id, where)
    if "prompt" in row:
        return from_task_row(row, source, row_id, where)
    raise DataError(f"{where}: unknown row schema: expected field 'input'/'output', 'messages' or 'prompt'")


RowConverter = Callable[[Any, str, str, str], Any]  # (row, source, row_id, where) -> a typed row


def read_jsonl(path: str | Path, source: str, convert: RowConverter = to_task_row) -> Iterator[Any]:
    """Rows of a jsonl file, converted by ``convert`` (SFT rows by default, preference pairs for RPO)."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: broken JSON: {error.msg} (column {error.colno})") from None
            yield convert(row, source, f"{source}-{line_no:06d}", where)


def read_parquet(path: str | Path, source: str, convert: RowConverter = to_task_row) -> Iterator[Any]:
    import pyarrow.parquet as pq

    for index, row in enumerate(pq.read_table(str(path)).to_pylist()):
        yield convert(row, source, f"{source}-{index:06d}", f"{path}: row {index}")


def read_hub(name: str, source: str, split: str, subset: str | None, max_rows: int | None,
             convert: RowConverter = to_task_row) -> Iterator[Any]:
    """Stream a hub dataset (or a local dataset directory) so only the rows used are downloaded."""
    from datasets import load_dataset

    dataset = load_dataset(name, subset, split=split, streaming=True)
    for index, row in enumerate(dataset):
        if max_rows is not None and index >= max_rows:
            return
        yield convert(row, source, f"{source}-{index:06d}", f"{name} ({split}): row {index}")
