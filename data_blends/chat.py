"""Chat formatting with the reasoning switch, and the assistant-only loss mask.

A conversation's system prompt carries ``/think`` or ``/no_think``. The assistant turn is always
``<think>reasoning</think>answer``; with ``/no_think`` the think block is empty (the Nemotron-Nano-2
convention). The chat template (``chat_template.jinja``) is the single definition of the text layout;
the mask is derived from it by rendering prefixes, so it also works for a pretrained checkpoint that
brings its own template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_blends.loaders import split_thinking
from data_blends.task import TaskRow

CHAT_TEMPLATE = (Path(__file__).with_name("chat_template.jinja")).read_text()
THINK_TAG, NO_THINK_TAG = "/think", "/no_think"


def system_prompt(think: bool, extra: str = "") -> str:
    """The system text: the control tag first, then any source-specific instructions."""
    tag = THINK_TAG if think else NO_THINK_TAG
    return f"{tag}\n{extra}" if extra else tag


def assistant_content(thinking: str, answer: str, think: bool) -> str:
    return f"<think>{thinking if think else ''}</think>{answer}"


def prompt_messages(row: TaskRow, think: bool) -> list[dict[str, str]]:
    """System, earlier turns and the last user message: what the model sees before it answers.

    Earlier assistant turns keep only their answer, in an empty think block, as in Nemotron-Nano-2:
    history never carries reasoning, and every assistant turn has the same layout.
    """
    history = [
        {"role": m["role"], "content": assistant_content("", split_thinking(m["content"])[1], think=False)}
        if m["role"] == "assistant" else m
        for m in row["context"]
    ]
    return [
        {"role": "system", "content": system_prompt(think, row["system"])},
        *history,
        {"role": "user", "content": row["prompt"]},
    ]


def conversation(row: TaskRow, think: bool) -> list[dict[str, str]]:
    """The full training conversation of a row in one reasoning mode."""
    reply = assistant_content(row["thinking"], row["answer"], think)
    return [*prompt_messages(row, think), {"role": "assistant", "content": reply}]


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    """Token ids and a 0/1 mask that is 1 on the final assistant reply only (its text and end marker).

    The reply spans from the end of the rendered prompt (with the generation prompt, so the think tags
    the prompt opens are not trained on) to the end of the conversation. Earlier turns are context.
    Raises ValueError when the template does not render the prompt as a prefix of the conversation,
    since the mask would then be wrong.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training conversation must end with an assistant reply")
    input_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    prefix = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                           return_dict=False)
    if input_ids[: len(prefix)] != prefix:
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    return {"input_ids": input_ids, "assistant_masks": [0] * len(prefix) + [1] * (len(input_ids) - len(prefix))}
