"""Registry, shared helpers, every registered reward on verdict and adversarial cases, and the
text-only rewards (format, safety, ifeval)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytest

from rewards import REWARDS, get_reward, summarize, weighted_sum
from rewards.code import CodeRewardConfig
from rewards.common import answer_text, boxed_contents, column, message_text
from rewards.format import format_reward, well_formed
from rewards.ifeval import check, count_words, ifeval_reward
from rewards.safety import is_help, is_refusal, safety_reward
from rewards.sandbox import SandboxLimits, sandbox_problem

CODE_CONFIG = CodeRewardConfig(limits=SandboxLimits(test_timeout=1.0, wall_timeout=20.0))
MATH_TIMEOUT = 1.0
# A call may also wait for a replacement math worker to start (interpreter plus math_verify, about
# a second on an idle machine) and scan its input in Python, so its bound leaves this much on top.
SLACK = 5.0


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


def test_summarize_counts_unscorable_apart_from_zero() -> None:
    assert summarize([1.0, 0.0, None, None]) == {"mean": 0.5, "unscorable": 0.5, "n": 4}
    assert summarize([0.0, 0.0]) == {"mean": 0.0, "unscorable": 0.0, "n": 2}
    everything_failed = summarize([None])
    assert math.isnan(everything_failed["mean"]) and everything_failed["unscorable"] == 1.0
    assert summarize([])["n"] == 0


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
    assert boxed_contents(r"\boxed{\boxed{1}} } \boxed{2\boxed{3}") == [r"\boxed{1}", "3"]  # outermost closed


def test_column_checks_length() -> None:
    assert column(None, 2, "gold") == [None, None]
    with pytest.raises(ValueError, match="'gold' has 1 entries for 2"):
        column(["a"], 2, "gold")


# ---------------------------------------------------------------- every registered reward

# name -> (options, columns, [correct, wrong, unscorable] completions, expected). format scores every
# row (the structure of any text can be judged), so it has no unscorable case.
VERDICTS: dict[str, tuple[dict[str, Any], dict[str, list[Any]], list[str], list[float | None]]] = {
    "math": ({}, {"gold": ["7", "7", "7"], "source": ["math", "math", "code"]},
             ["</think>\\boxed{7}", "</think>\\boxed{8}", "</think>\\boxed{7}"], [1.0, 0.0, None]),
    "science": ({}, {"gold": ["B", "6.02\\times10^{23}", ""]},
                ["</think>The answer is (B).", "</think>\\boxed{6.02}", "</think>\\boxed{B}"],
                [1.0, 0.0, None]),
    "code": ({"config": CODE_CONFIG},
             {"tests": [["assert add(1, 2) == 3"], ["assert add(1, 2) == 3"], []]},
             ["```python\ndef add(a, b):\n    return a + b\n```",
              "```python\ndef add(a, b):\n    return a\n```",
              "```python\ndef add(a, b):\n    return a + b\n```"], [1.0, 0.0, None]),
    "ifeval": ({}, {"constraints": [["lowercase"]] * 3, "source": ["ifeval", None, "math"]},
               ["</think>all quiet", "</think>Not quiet", "</think>all quiet"], [1.0, 0.0, None]),
    "safety": ({}, {"gold": ["refuse", "refuse", ""]},
               ["</think>I can't help with that.", "</think>Sure, step one...",
                "</think>I can't help with that."], [1.0, 0.0, None]),
    "format": ({}, {"reasoning": [True, "off"]}, ["<think>plan</think>answer", "<think>plan</think>answer"],
               [1.0, 0.0]),
}


def call_reward(name: str, completions: list[Any], options: dict[str, Any],
                columns: dict[str, list[Any]]) -> list[float | None]:
    """Call a registered reward the way TRL does; the code reward needs the sandbox."""
    if name == "code" and sandbox_problem() is not None:
        pytest.skip(f"no sandbox: {sandbox_problem()}")
    return get_reward(name, **options)(prompts=["q"] * len(completions), completions=completions, **columns)


def test_every_registered_reward_has_verdict_and_adversarial_cases() -> None:
    assert set(VERDICTS) == set(REWARDS) == set(ADVERSARIAL_COLUMNS)


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_reward_scores_correct_wrong_and_unscorable(name: str) -> None:
    options, columns, completions, expected = VERDICTS[name]
    assert call_reward(name, completions, options, columns) == expected


# name -> (options, one row of columns per completion scored); the rows make each reward parse the
# answer (math verifies, science reads a letter, code runs a block, ifeval runs every check). A
# numeric science gold goes through the math reward's own scoring, covered by the math row.
ADVERSARIAL_COLUMNS: dict[str, tuple[dict[str, Any], dict[str, list[Any]]]] = {
    "math": ({"timeout": MATH_TIMEOUT}, {"gold": ["7"]}),
    "science": ({}, {"gold": ["B"]}),
    "code": ({"config": CODE_CONFIG}, {"tests": [["assert add(1, 2) == 3"]]}),
    "ifeval": ({"strict": False}, {"constraints": [[
        "lowercase", "uppercase", "max_words:5", "min_words:2", "include:cat", "exclude:cat", "end_with:bye",
        "start_with:Dear", "quoted", "lines:2"]]}),
    "safety": ({}, {"gold": ["refuse"]}),
    "format": ({}, {"reasoning": ["off"]}),
}

# Completions that have made parsers crash or loop; each takes the size of the big ones in characters.
ADVERSARIAL: dict[str, Callable[[int], str]] = {
    "empty": lambda size: "",
    "plain text": lambda size: "word " * (size // 5),
    "unclosed openers": lambda size: ("<think>\\boxed{```python\n" * (size // 24 + 1))[:size],
    "repeated boxes": lambda size: "</think>" + "\\boxed{8} " * (size // 10),
    "nested boxes": lambda size: "\\boxed{" * (size // 16) + "}" * (size // 16),
    "long whitespace": lambda size: "The answer is" + " " * size + "x \\boxed{" + " " * size,
    "long box": lambda size: "\\boxed{" + "1+" * (size // 2) + "1}",
    "invalid utf-8": lambda size: (
        b"\xff\xfe<think>\xc3(</think>\\boxed{\xed\xa0\x80}".decode("utf-8", "surrogateescape")
        + "\ufffd answer is \ud800\n```python\ndef add(a, b):\n    return '\udcff'\n```"),
    "control characters": lambda size: "\x00\x1b[2J\r\b\x7f<think>\x00</think>\x07\\boxed{8\x00}\x0c\u202e",
    "unbalanced think": lambda size: "<think>" * 1000 + "</think><think></think>" * 1000 + "</think>",
    "several boxes": lambda size: "</think>\\boxed{1} then \\boxed{2}, finally \\boxed{7}",
    "power tower": lambda size: "\\boxed{9^{9^{9^{9}}}}",
    "deep fractions": lambda size: "\\boxed{" + "\\frac{1}{" * 300 + "2" + "}" * 300 + "}",
}


def score_adversarial(name: str, case: str, size: int) -> float:
    """Score one adversarial completion, check the values, and return the call's wall time."""
    options, columns = ADVERSARIAL_COLUMNS[name]
    completions = [ADVERSARIAL[case](size)] * len(next(iter(columns.values())))
    start = time.monotonic()
    scores = call_reward(name, completions, options, columns)
    elapsed = time.monotonic() - start
    assert len(scores) == len(completions)
    assert all(value is None or (type(value) is float and 0.0 <= value <= 1.0) for value in scores), scores
    if name in ("math", "science", "code"):  # none of the cases holds the right answer
        assert all(value in (0.0, None) for value in scores), scores
    return elapsed


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("name", sorted(ADVERSARIAL_COLUMNS))
def test_adversarial_completions_are_scored_in_time(name: str, case: str) -> None:
    """One-megabyte twin of the ten-megabyte test: large enough that a quadratic scan would hang."""
    assert score_adversarial(name, case, 1 << 20) < MATH_TIMEOUT + SLACK


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ADVERSARIAL_COLUMNS))
def test_ten_megabyte_completions_are_scored_in_time(name: str) -> None:
    """A linear scan of 10 MB in Python takes seconds on a busy 2-core machine; a quadratic one, hours."""
    for case in ("plain text", "unclosed openers", "repeated boxes", "nested boxes", "long whitespace",
                 "long box"):
        assert score_adversarial(name, case, 10 << 20) < 30.0, case


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


@pytest.mark.parametrize("reply", ["The answer is \\boxed{1}.", "Ok.", "", "I can't help with that."])
def test_a_benign_prompt_is_not_helped_by_a_token_reply(reply: str) -> None:
    assert safety_reward(prompts=["p"], completions=[f"</think>{reply}"], gold=["comply"]) == [0.0]
    assert not is_help(reply)


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
