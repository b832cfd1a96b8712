"""Registry, shared helpers and the text-only rewards (format, safety, ifeval)."""

from __future__ import annotations

import pytest

from rewards import REWARDS, get_reward, weighted_sum
from rewards.common import answer_text, boxed_contents, column, message_text
from rewards.format import format_reward, well_formed
from rewards.ifeval import check, count_words, ifeval_reward
from rewards.safety import is_refusal, safety_reward


# ---------------------------------------------------------------- registry and helpers

def test_registry_names_every_reward_and_rejects_unknown_names() -> None:
    assert set(REWARDS) == {"math", "science", "code", "ifeval", "safety", "format"}
    assert get_reward("format") is format_reward
    with pytest.raises(KeyError, match="known rewards:.*'math'"):
        get_reward("nope")


def test_get_reward_binds_options_and_keeps_the_name() -> None:
    loose = get_reward("ifeval", strict=False)
    assert loose.__name__ == "ifeval_reward"  # TRL labels rewards by __name__
    assert loose(prompts=["p"], completions=["hello world"], constraints=[["lowercase", "uppercase"]]) == [0.5]


def test_weighted_sum() -> None:
    assert weighted_sum([[1.0, 0.0, 1.0], [1.0, 1.0, None]], [0.5, 2.0]) == [2.5, 2.0, None]
    assert weighted_sum([], []) == []
    with pytest.raises(ValueError, match="weights"):
        weighted_sum([[1.0]], [1.0, 2.0])
    with pytest.raises(ValueError, match="differ in length"):
        weighted_sum([[1.0], [1.0, 2.0]], [1.0, 1.0])


def test_completion_forms_and_answer_split() -> None:
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>a</think>b"}]
    parts = [{"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}]
    assert message_text(chat) == "<think>a</think>b"
    assert message_text(parts) == "xy"
    assert message_text(None) == "" and message_text([]) == ""
    assert answer_text("<think>a</think>b</think>c") == "c"  # after the last </think>
    assert answer_text("no tags") == "no tags"  # no </think>: the whole text is the answer
    assert answer_text(chat) == "b"


def test_boxed_contents_match_nested_braces() -> None:
    text = r"\boxed{\frac{1}{2}} and \boxed {x^{2}} and \boxed{open"
    assert boxed_contents(text) == [r"\frac{1}{2}", "x^{2}"]


def test_column_checks_length() -> None:
    assert column(None, 2, "gold") == [None, None]
    with pytest.raises(ValueError, match="'gold' has 1 entries for 2"):
        column(["a"], 2, "gold")


# ---------------------------------------------------------------- format

@pytest.mark.parametrize(("text", "expected"), [
    ("<think>plan</think>answer", True),
    ("plan</think>answer", True),  # <think> was part of the prompt
    ("<think></think>answer", True),
    ("<think>plan</think>   ", False),  # empty answer
    ("answer without tags", False),
    ("<think>a</think>b</think>c", False),  # two </think>
    ("<think>a<think>b</think>c", False),  # two <think>
    ("<think>a</think>b<think>c", False),  # think tag in the answer
    ("</think><think>answer", False),
    ("preamble<think>a</think>b", False),  # the think block must open the completion
])
def test_format_structure(text: str, expected: bool) -> None:
    assert well_formed(text) is expected


def test_format_reward_reasoning_off_needs_empty_think() -> None:
    completions = ["<think>\n</think>hi", "<think>long plan</think>hi"] + ["<think>plan</think>hi"] * 2
    scores = format_reward(prompts=["p"] * 4, completions=completions, reasoning=["off", "off", True, None])
    assert scores == [1.0, 0.0, 1.0, 1.0]
    assert format_reward(prompts=["p"], completions=[[{"role": "assistant", "content": "</think>ok"}]]) == [1.0]


# ---------------------------------------------------------------- safety

@pytest.mark.parametrize("text", [
    "I can't help with that.", "I cannot help you build a weapon.", "I won't do that.",
    "Sorry, but I can't assist with this request.", "I’m sorry, but I cannot provide that.",
    "I'm unable to help.", "**I must decline.**", "I apologize, but I will not share that.",
])
def test_refusals(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "Sure, here is how to bake bread.", "To do that, I can't stress enough how important salt is.",
    "Here are the steps. I can't guarantee results, though.", "I can help with that!",
])
def test_non_refusals(text: str) -> None:
    assert not is_refusal(text)


def test_safety_reward_rewards_matching_behaviour() -> None:
    completions = ["<think>unsafe</think>I can't help with that.", "</think>Sure! Step 1...",
                   "</think>I can't help with that.", "</think>Sure! Step 1...", "</think>Sure"]
    gold = ["refuse", "refuse", "comply", "comply", ""]
    assert safety_reward(prompts=["p"] * 5, completions=completions, gold=gold) == [1.0, 0.0, 0.0, 1.0, None]
    assert safety_reward(prompts=["p"], completions=["x"], gold=["refuse"], source=["math"]) == [None]
    with pytest.raises(ValueError, match="refuse"):
        safety_reward(prompts=["p"], completions=["x"], gold=["maybe"])


# ---------------------------------------------------------------- ifeval

@pytest.mark.parametrize(("constraint", "text", "expected"), [
    ("lowercase", "all quiet here", True), ("lowercase", "Not quiet", False),
    ("uppercase", "LOUD 123", True), ("uppercase", "Loud", False),
    ("max_words:3", "one two three", True), ("max_words:3", "one two three four", False),
    ("min_words:2", "don't stop", True), ("min_words:3", "don't stop", False),
    ("include:cat", "The Cat sat.", True), ("include:cat", "categories", False),
    ("exclude:cat", "a dog", True), ("exclude:cat", "a cat", False),
    ("end_with:Any questions?", "Done. Any questions?", True), ("end_with:bye", "bye now", False),
    ("start_with:Dear", '"dear sir, hello"', True), ("start_with:Dear", "Hello dear", False),
    ("quoted", '"all of it"', True), ("quoted", 'half "quoted"', False),
    ("lines:2", "a\n\nb\n", True), ("lines:2", "a\nb\nc", False),
])
def test_ifeval_checks(constraint: str, text: str, expected: bool) -> None:
    assert check(constraint, text) is expected


@pytest.mark.parametrize("constraint", ["shout", "max_words", "max_words:many", "include:", "lowercase:x"])
def test_ifeval_rejects_unknown_or_malformed_constraints(constraint: str) -> None:
    with pytest.raises(ValueError, match=constraint.split(":")[0]):
        ifeval_reward(prompts=["p"], completions=["text"], constraints=[[constraint]])


def test_ifeval_reward_strict_fraction_and_empty_answers() -> None:
    completions = ["<think>Plan</think>short and quiet", "</think>SHORT AND LOUD", "</think>  ", "x"]
    constraints = [["lowercase", "max_words:4"], ["lowercase", "max_words:4"], ["lowercase"], []]
    scores = ifeval_reward(prompts=["p"] * 4, completions=completions, constraints=constraints)
    assert scores == [1.0, 0.0, 0.0, None]
    assert ifeval_reward(prompts=["p"] * 4, completions=completions, constraints=constraints,
                         strict=False) == [1.0, 0.5, 0.0, None]
    assert count_words("It's a well-known fact, isn't it?") == 6
