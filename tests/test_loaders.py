"""Loaders read the public schemas and stop on a bad row with its file, line and field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_blends.loaders import DataError, read_jsonl, read_parquet
from tests.conftest import FIXTURES


def test_llama_nemotron_rows(sample_rows):
    math_on, math_off, code = sample_rows[0], sample_rows[1], sample_rows[2]
    assert math_on["thinking"].startswith("Average speed") and "\\boxed{72}" in math_on["answer"]
    assert math_off["thinking"] == "" and math_off["answer"] == "17 * 23 = \\boxed{391}."
    assert code["answer"].startswith("```python")
    chat = sample_rows[4]
    assert chat["prompt"] == "She is grey and very lazy." and len(chat["context"]) == 2
    assert all(row["system"] == "" for row in sample_rows)  # "detailed thinking on/off" is the switch, dropped


def test_messages_rows(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Be brief. /think"},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "<think>greet</think>Hello!"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (row,) = read_jsonl(path, "chat")
    assert (row["system"], row["prompt"], row["thinking"], row["answer"]) == ("Be brief.", "Hi", "greet", "Hello!")


def _write_lines(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"input": [{"role": "user", "content": "q"}], "output": "a", "reasoning": "off"})


@pytest.mark.parametrize("bad_line, message", [
    ('{"input": [{"role": "user", "content": "q"}], "output": "a"', "broken JSON"),
    (json.dumps({"input": [{"role": "user", "content": "q"}], "reasoning": "off"}), "missing field 'output'"),
    (json.dumps({"input": [{"role": "user", "content": "q"}], "output": 3, "reasoning": "off"}),
     "field 'output' must be str"),
    (json.dumps({"input": [{"role": "user"}], "output": "a", "reasoning": "off"}), "field input[0]"),
    (json.dumps({"input": [{"role": "user", "content": "q"}], "output": "a", "reasoning": "maybe"}),
     "field 'reasoning'"),
    (json.dumps({"input": [{"role": "user", "content": "q"}], "output": "<think>x</think>a", "reasoning": "off"}),
     "has reasoning although"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "field 'messages' must end"),
    (json.dumps({"text": "hello"}), "unknown row schema"),
    (json.dumps({"prompt": "What is 2 + 3?", "answer": "5", "steps": "one"}), "field 'steps' must be int"),
])
def test_bad_row_names_file_line_and_field(tmp_path, bad_line, message):
    path = _write_lines(tmp_path, [GOOD, GOOD, bad_line])
    with pytest.raises(DataError) as error:
        list(read_jsonl(path, "s"))
    assert f"{path}:3" in str(error.value) and message in str(error.value)


def test_parquet_reads_same_rows_as_jsonl(tmp_path):
    raw = [json.loads(line) for line in (FIXTURES / "llama_nemotron_sft_sample.jsonl").read_text().splitlines()]
    path = tmp_path / "sample.parquet"
    pq.write_table(pa.Table.from_pylist(raw), path)
    from_parquet = [(r["prompt"], r["thinking"], r["answer"]) for r in read_parquet(path, "s")]
    from_jsonl = [(r["prompt"], r["thinking"], r["answer"]) for r in read_jsonl(
        FIXTURES / "llama_nemotron_sft_sample.jsonl", "s")]
    assert from_parquet == from_jsonl


def test_parquet_bad_row_names_the_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": "q"}]}]), path)
    with pytest.raises(DataError, match=r"bad.parquet: row 0: field 'messages'"):
        list(read_parquet(path, "s"))
