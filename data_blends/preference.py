"""Preference pairs (a prompt, a chosen and a rejected response, their rewards) for the RPO stage.

Two public row schemas are read, detected per row:
- NeMo-Aligner's DPO/RPO JSONL: ``prompt`` (a string, taken as the user message, or a list of
  messages), ``chosen_response``, ``rejected_response``, optional ``chosen_reward``/``rejected_reward``.
- Hub-style rows: ``chosen`` and ``rejected`` as message lists whose last message is the assistant's
  response; earlier messages are the prompt, or, when both lists hold only the response, the row's
  ``prompt`` (string or messages). Rewards are ``chosen_reward``/``rejected_reward`` or
  ``score_chosen``/``score_rejected``.
Missing rewards take configurable defaults (NeMo-Aligner's 1.0 and 0.0): RPO then sees the same gap on
every pair, as plain DPO data would give it. A bad row stops the load with a ``DataError`` naming the
file, the line (or row) and the field, as ``data_blends.loaders`` does for SFT rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from data_blends.chat import assistant_content, prompt_messages
from data_blends.loaders import (DataError, _field, _messages, _system_text, read_hub, read_jsonl, read_parquet,
                                  split_thinking)
from data_blends.task import make_row

DEFAULT_REWARDS = (1.0, 0.0)  # (chosen, rejected) when a row has none
_REWARD_FIELDS = (("chosen_reward", "rejected_reward"), ("score_chosen", "score_rejected"))


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]  # optional system message(s), earlier turns, and the last user message
    chosen: str  # the preferred assistant response; may open with a <think>...</think> block
    rejected: str
    chosen_reward: float
    rejected_reward: float
    source: str  # label of the data source, for logs and blends


def _prompt(value: Any, name: str, where: str) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, name, where)
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: field {name!r} must end with a user message")
    return messages


def _response(row: dict, name: str, where: str) -> tuple[list[dict[str, str]], str]:
    """(earlier turns, response) of a message-list response field."""
    messages = _messages(_field(row, name, list, where), name, where)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {name!r} must end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def _number(row: dict, name: str, where: str) -> float:
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field {name!r} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise DataError(f"{where}: field {name!r} must be finite, got {value}")
    return float(value)


def _rewards(row: dict, where: str, defaults: tuple[float, float]) -> tuple[float, float]:
    """The row's (chosen, rejected) rewards; a null counts as absent (parquet fills absent keys with it)."""
    for names in _REWARD_FIELDS:
        given = [name for name in names if row.get(name) is not None]
        if len(given) == 1:
            missing = next(name for name in names if name not in given)
            raise DataError(f"{where}: field {missing!r} is missing while {given[0]!r} is given")
        if given:
            return _number(row, names[0], where), _number(row, names[1], where)
    return defaults


def to_preference_pair(row: Any, source: str, row_id: str, where: str,
                       default_rewards: tuple[float, float] = DEFAULT_REWARDS) -> PreferencePair:
    """Detect the row's schema and convert it; ``where`` (file:line or file: row N) prefixes errors."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "chosen_response" in row or "rejected_response" in row:
        prompt = _prompt(_field(row, "prompt", (str, list), where), "prompt", where)
        chosen = _field(row, "chosen_response", str, where)
        rejected = _field(row, "rejected_response", str, where)
    elif "chosen" in row or "rejected" in row:
        chosen_turns, chosen = _response(row, "chosen", where)
        rejected_turns, rejected = _response(row, "rejected", where)
        if chosen_turns and rejected_turns and chosen_turns != rejected_turns:
            raise DataError(f"{where}: field 'rejected' has other prompt turns than 'chosen'")
        prompt = chosen_turns or rejected_turns
        if prompt and prompt[-1]["role"] != "user":
            name = "chosen" if chosen_turns else "rejected"
            raise DataError(f"{where}: field {name!r} must have a user message right before the response")
        if not prompt:
            prompt = _prompt(_field(row, "prompt", (str, list), where), "prompt", where)
    else:
        raise DataError(f"{where}: unknown row schema: expected field 'chosen_response' or 'chosen'")
    return PreferencePair(prompt, chosen, rejected, *_rewards(row, where, default_rewards), source=source)


def read_pairs(kind: str, path: str, source: str, split: str = "train", subset: str | None = None,
               max_rows: int | None = None,
               default_rewards: tuple[float, float] = DEFAULT_REWARDS) -> Iterator[PreferencePair]:
    """Preference pairs from a jsonl or parquet file or a hub dataset, with the SFT loaders' readers."""
    convert = functools.partial(to_preference_pair, default_rewards=default_rewards)
    if kind == "jsonl":
        return read_jsonl(path, source, convert)
    if kind == "parquet":
        return read_parquet(path, source, convert)
    return read_hub(path, source, split, subset, max_rows, convert)


def _completion(tokenizer: Any, messages: list[dict[str, str]], prompt: str, reply: str) -> str:
    """The text the template renders after ``prompt`` for ``reply``, ending at the EOS token.

    The template closes a turn with ``<|im_end|>\\n``; TRL's DPOTrainer appends EOS to a text completion
    that does not end with it (``add_eos`` in ``_prepare_dataset``), which would double it. Generation
    stops at EOS, so the turn's trailing newline is not part of what the model is scored on.
    """
    text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": reply}], tokenize=False)
    if not text.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    completion = text[len(prompt):]
    end = completion.rfind(tokenizer.eos_token) if tokenizer.eos_token else -1
    return completion[: end + len(tokenizer.eos_token)] if end >= 0 else completion


def to_dpo_columns(pair: PreferencePair, tokenizer: Any, think: bool) -> dict[str, str | float]:
    """The text columns of TRL's DPOTrainer (``prompt``, ``chosen``, ``rejected``) plus the two rewards.

    The prompt is rendered with the tokenizer's chat template as ``data_blends.chat`` builds it: the
    /think or /no_think system prompt (any control tag in the pair's own system text is replaced) and
    the generation prompt, which opens the think block (and closes it with /no_think). Each response
    is the rest of the rendered conversation. Raises ValueError for /no_think with a response that
    thinks, since that response could not be produced in that mode.
    """
    system = "\n".join(_system_text(m["content"]) for m in pair.prompt if m["role"] == "system").strip()
    turns = [m for m in pair.prompt if m["role"] != "system"]
    row = make_row(source=pair.source, system=system, context=turns[:-1], prompt=turns[-1]["content"])
    messages = prompt_messages(row, think)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    columns: dict[str, str | float] = {"prompt": prompt}
    for name, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        thinking, answer = split_thinking(response)
        if thinking and not think:
            raise ValueError(f"pair from {pair.source!r}: the {name} response has reasoning, so it cannot be "
                             "rendered in /no_think mode")
        columns[name] = _completion(tokenizer, messages, prompt, assistant_content(thinking, answer, think))
    return columns | {"chosen_reward": pair.chosen_reward, "rejected_reward": pair.rejected_reward}
