"""Preference pairs: both public schemas, default rewards, bad rows named by file:line:field, rendering."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_blends.loaders import DataError
from data_blends.preference import (
    PreferencePair,
    read_pairs,
    to_dpo_columns,
)
from tests.conftest import FIXTURES


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief. /think"}
MESSAGES_ROW = {  # hub style: the prompt turns lead both response lists
    "chosen": [SYSTEM, user("2+2?"), assistant("<think>add</think>4")],
    "rejected": [SYSTEM, user("2+2?"), assistant("<think>guess</think>5")],
    "score_chosen": 9.0, "score_rejected": 2,
}
NEMO_ROW = {"prompt": "q", "chosen_response": "a", "rejected_response": "b", "chosen_reward": 1, "rejected_reward": 0}


def write_jsonl(tmp_path, lines: list[str]):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_nemo_aligner_rows_with_default_rewards():
    pairs = list(read_pairs("jsonl", FIXTURES / "nemo_aligner_rpo_sample.jsonl", "nemo"))
    assert pairs[1] == PreferencePair(
        prompt=[user("Reply in exactly three words: what colour is the sky?")], chosen="Usually it's blue.",
        rejected="The sky is usually blue on a clear day.", chosen_reward=0.9, rejected_reward=0.2, source="nemo")
    assert (pairs[2].chosen_reward, pairs[2].rejected_reward) == (1.0, 0.0)  # the row has no rewards
    (_, _, custom) = read_pairs("jsonl", FIXTURES / "nemo_aligner_rpo_sample.jsonl", "nemo", default_rewards=(0.5, -0.5))
    assert (custom.chosen_reward, custom.rejected_reward) == (0.5, -0.5)


def test_nemo_aligner_prompt_as_messages(tmp_path):
    row = NEMO_ROW | {"prompt": [SYSTEM, user("q")]}
    (pair,) = read_pairs("jsonl", write_jsonl(tmp_path, [json.dumps(row)]), "s")
    assert pair.prompt == [SYSTEM, user("q")] and (pair.chosen, pair.rejected) == ("a", "b")


def test_message_rows_take_the_prompt_from_the_leading_turns_or_the_prompt_field(tmp_path):
    explicit = {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go")],
                "chosen_reward": 0.8, "rejected_reward": 0.1}
    path = write_jsonl(tmp_path, [json.dumps(MESSAGES_ROW), json.dumps(explicit)])
    leading, separate = read_pairs("jsonl", path, "hub")
    assert leading == PreferencePair([SYSTEM, user("2+2?")], "<think>add</think>4", "<think>guess</think>5",
                                     9.0, 2.0, "hub")
    assert (separate.prompt, separate.chosen, separate.chosen_reward) == ([user("hi")], "hello", 0.8)


GOOD = json.dumps(NEMO_ROW)


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "q", "chosen_response": "a"', "broken JSON"),
    (json.dumps({"prompt": "q", "chosen_response": "a"}), "missing field 'rejected_response'"),
    (json.dumps(NEMO_ROW | {"prompt": 3}), "field 'prompt' must be str or list"),
    (json.dumps(NEMO_ROW | {"prompt": [user("q"), assistant("a")]}), "field 'prompt' must end with a user message"),
    (json.dumps(NEMO_ROW | {"chosen_response": ["a"]}), "field 'chosen_response' must be str"),
    (json.dumps(NEMO_ROW | {"chosen_reward": "high"}), "field 'chosen_reward' must be a number"),
    (json.dumps(NEMO_ROW | {"rejected_reward": True}), "field 'rejected_reward' must be a number"),
    (json.dumps(NEMO_ROW | {"chosen_reward": float("nan")}), "field 'chosen_reward' must be finite"),
    (json.dumps({k: v for k, v in NEMO_ROW.items() if k != "rejected_reward"}),
     "field 'rejected_reward' is missing while 'chosen_reward' is given"),
    (json.dumps(MESSAGES_ROW | {"score_chosen": None}), "field 'score_chosen' is missing while 'score_rejected'"),
    (json.dumps(MESSAGES_ROW | {"chosen": [user("2+2?")]}), "field 'chosen' must end with an assistant message"),
    (json.dumps(MESSAGES_ROW | {"rejected": [user("2+2?"), {"role": "assistant"}]}), "field rejected[1]"),
    (json.dumps(MESSAGES_ROW | {"rejected": [user("3+3?"), assistant("6")]}), "field 'rejected' has other prompt"),
    (json.dumps(MESSAGES_ROW | {"chosen": [SYSTEM, assistant("4")], "rejected": [SYSTEM, assistant("5")]}),
     "field 'chosen' must have a user message right before the response"),
    (json.dumps({"chosen": [assistant("4")], "rejected": [assistant("5")]}), "missing field 'prompt'"),
    (json.dumps({"question": "q", "answer": "a"}), "unknown row schema"),
    (json.dumps(["q", "a", "b"]), "expected a JSON object"),
])
def test_bad_row_names_file_line_and_field(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path, [GOOD, GOOD, bad_line])
    with pytest.raises(DataError) as error:
        list(read_pairs("jsonl", path, "s"))
    assert f"{path}:3: " in str(error.value) and message in str(error.value)


def test_parquet_and_local_dataset_dir_read_the_same_pairs_as_jsonl(tmp_path):
    rows = [MESSAGES_ROW, MESSAGES_ROW | {"score_chosen": None, "score_rejected": None}]
    jsonl = write_jsonl(tmp_path, [json.dumps(row) for row in rows])
    data_dir = tmp_path / "hub"
    data_dir.mkdir()
    parquet = data_dir / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    expected = list(read_pairs("jsonl", jsonl, "s"))
    assert (expected[1].chosen_reward, expected[1].rejected_reward) == (1.0, 0.0)  # nulls read as absent
    assert list(read_pairs("parquet", parquet, "s")) == expected
    assert list(read_pairs("hub", str(data_dir), "s")) == expected
    assert list(read_pairs("hub", str(data_dir), "s", max_rows=1)) == expected[:1]


def test_parquet_bad_row_names_the_row_and_field(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([NEMO_ROW, NEMO_ROW | {"chosen_response": None}]), path)
    with pytest.raises(DataError, match=r"bad.parquet: row 1: field 'chosen_response' must be str"):
        list(read_pairs("parquet", path, "s"))


def test_dpo_columns_in_both_modes(tokenizer):
    pair = PreferencePair([SYSTEM, user("2+2?")], "<think>add</think>4", "5", 1.0, 0.0, "s")
    think = to_dpo_columns(pair, tokenizer, think=True)
    assert think["prompt"] == ("<|im_start|>system\n/think\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                               "<|im_start|>assistant\n<think>")
    assert (think["chosen"], think["rejected"]) == ("add</think>4<|im_end|>", "</think>5<|im_end|>")
    assert (think["chosen_reward"], think["rejected_reward"]) == (1.0, 0.0)

    plain = PreferencePair([SYSTEM, user("2+2?")], "4", "5", 1.0, 0.0, "s")
    no_think = to_dpo_columns(plain, tokenizer, think=False)
    assert no_think["prompt"].startswith("<|im_start|>system\n/no_think\nBe brief.<|im_end|>")  # tag replaced
    assert no_think["prompt"].endswith("<|im_start|>assistant\n<think></think>")
    assert no_think["chosen"] == "4<|im_end|>"  # ends at EOS once, so TRL adds none
    with pytest.raises(ValueError, match="chosen response has reasoning"):
        to_dpo_columns(pair, tokenizer, think=False)


def test_dpo_columns_keep_history_answers_without_reasoning(tokenizer):
    pair = PreferencePair([user("hi"), assistant("<think>greet</think>hello"), user("2+2?")], "4", "5", 1, 0, "s")
    prompt = to_dpo_columns(pair, tokenizer, think=True)["prompt"]
    assert "<|im_start|>assistant\n<think></think>hello<|im_end|>" in prompt and "greet" not in prompt


def test_prompt_tokens_are_a_prefix_of_prompt_and_response_tokens(tokenizer):
    """TRL splits prompt and response by token prefix; the split must fall where the text does."""
    for pair in read_pairs("jsonl", FIXTURES / "nemo_aligner_rpo_sample.jsonl", "nemo"):
        for think in (True, False):
            columns = to_dpo_columns(pair, tokenizer, think)
            prompt_ids = tokenizer(columns["prompt"])["input_ids"]
            full_ids = tokenizer(columns["prompt"] + columns["chosen"])["input_ids"]
            assert full_ids[: len(prompt_ids)] == prompt_ids
            assert tokenizer.decode(full_ids[len(prompt_ids):]) == columns["chosen"]
