"""Math and science rewards, and the deadline-bound worker pool behind them."""

from __future__ import annotations

import threading
import time

import pytest

import rewards.math
from rewards.math import final_box, math_reward, restates_question
from rewards.science import predicted_letter, science_reward
from rewards.workers import DeadlinePool


def sleepy_verify(gold: str, boxed: str, timeout: int) -> bool:
    """Stands in for the verifier: a verification that never finishes on its own."""
    time.sleep(60)
    return True


def slow_or_echo(value: str) -> str:
    if value == "slow":
        time.sleep(60)
    return value


def test_math_reward_scores_the_final_box() -> None:
    completions = [
        "<think>123+456=579</think>The sum is \\boxed{579}.",
        "</think>\\boxed{580}",
        "</think>579",  # no box
        "\\boxed{579}",  # no </think>: the whole text is the answer
        [{"role": "assistant", "content": "<think></think>\\boxed{579.0}"}],
        "<think>maybe \\boxed{1}</think>\\boxed{579}",  # boxes in the reasoning do not count
    ]
    scores = math_reward(prompts=["What is 123+456?"] * 6, completions=completions, gold=["579"] * 6)
    assert scores == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_math_reward_latex_equivalence_and_gold_forms() -> None:
    completions = ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{\\dfrac12}", "\\boxed{2^{-1}}"]
    gold = ["0.5", "$\\frac{1}{2}$", "\\boxed{\\frac{1}{2}}", "\\frac12"]
    assert math_reward(prompts=["q"] * 4, completions=completions, gold=gold) == [1.0] * 4


def test_math_reward_rejects_hedging_between_different_boxes() -> None:
    completions = ["\\boxed{579} or maybe \\boxed{580}", "\\boxed{580} no, \\boxed{579}",
                   "\\boxed{579} so \\boxed{ 579 }"]
    assert math_reward(prompts=["q"] * 3, completions=completions, gold=["579"] * 3) == [0.0, 0.0, 1.0]
    assert final_box("\\boxed{1} \\boxed{2}") is None
    assert final_box("\\boxed{} text") is None


def test_math_reward_rejects_restated_question() -> None:
    prompts = ["What is 123 + 456?", "Factor $x^2 + 2x + 1$.", "Factor $x^2 + 2x + 1$."]
    completions = ["\\boxed{123+456}", "\\boxed{x^2+2x+1}", "\\boxed{(x+1)^2}"]
    gold = ["579", "(x+1)^2", "(x+1)^2"]
    assert math_reward(prompts=prompts, completions=completions, gold=gold) == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(("boxed", "prompt", "gold", "expected"), [
    ("123+456", "What is 123+456?", "579", True),
    ("2 \\times 3", "Compute $2\\times3$.", "6", True),
    ("579", "Is 579 prime?", "579", False),  # plain numbers may repeat the question
    ("-5", "Find x if x + 5 = 0 (hint: -5 < 0)", "-5", False),  # a sign is not an operator
    ("(-5)", "Evaluate f(-5) where f(x) = x", "-5", False),
    ("\\frac{1}{2}", "Write \\frac{1}{2} as a decimal.", "0.5", False),  # canonical forms pass
    ("x+1", "Is the answer x+1 or x-1?", "x+1", False),  # the gold's own text is fine
    ("2+3", "What is 4+5?", "9", False),  # not from the question (and wrong anyway)
])
def test_restates_question_rule(boxed: str, prompt: str, gold: str, expected: bool) -> None:
    assert restates_question(boxed, prompt, gold) is expected


def test_math_reward_marks_other_sources_and_missing_gold_none() -> None:
    scores = math_reward(prompts=["q"] * 3, completions=["\\boxed{1}"] * 3, gold=["1", "1", ""],
                         source=["math", "code", "math"])
    assert scores == [1.0, None, None]


def test_math_reward_works_off_the_main_thread() -> None:
    out: list[list[float | None]] = []
    thread = threading.Thread(target=lambda: out.append(
        math_reward(prompts=["q", "q"], completions=["\\boxed{\\sqrt{4}}", "\\boxed{3}"], gold=["2", "2"])))
    thread.start()
    thread.join(timeout=60)
    assert out == [[1.0, 0.0]]


def test_math_reward_kills_a_stuck_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    assert math_reward(prompts=["q"], completions=["\\boxed{1}"], gold=["1"]) == [1.0]  # workers warm
    monkeypatch.setattr(rewards.math, "verify_boxed", sleepy_verify)
    start = time.monotonic()
    scores = math_reward(prompts=["q"] * 2, completions=["\\boxed{1}", "no box"], gold=["1", "1"], timeout=1.0)
    elapsed = time.monotonic() - start
    assert scores == [None, 0.0]
    assert elapsed < 2.5, elapsed
    monkeypatch.undo()
    assert math_reward(prompts=["q"], completions=["\\boxed{1}"], gold=["1"]) == [1.0]  # later calls work


def test_deadline_pool_isolates_slow_calls() -> None:
    pool = DeadlinePool(size=2)
    try:
        assert pool.map(slow_or_echo, [("warm",), ("up",)], deadline=30.0) == ["warm", "up"]
        start = time.monotonic()
        calls = [("slow",), ("a",), ("b",), ("c",)]
        assert pool.map(slow_or_echo, calls, deadline=1.0) == [None, "a", "b", "c"]
        assert time.monotonic() - start < 2.5
        assert pool.map(slow_or_echo, [("again",)], deadline=30.0) == ["again"]
        assert pool.map(lambda: 1, [()], deadline=1.0) == [None]  # cannot be pickled: not scored
    finally:
        pool.close()


def test_science_letters_and_numbers() -> None:
    completions = [
        "</think>\\boxed{B}", "</think>The answer is (B).", "</think>Answer: **B**",
        "</think>\\boxed{\\text{(B)}}",
        "</think>\\boxed{C}", "</think>\\boxed{A} or \\boxed{B}", "</think>the answer is a photon",
        "</think>\\boxed{6.02 \\times 10^{23}}", "</think>\\boxed{42}",
    ]
    gold = ["B", "B", "B", "(B)", "B", "B", "A", "6.02\\times10^{23}", "41"]
    scores = science_reward(prompts=["q"] * 9, completions=completions, gold=gold)
    assert scores == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert predicted_letter("The answer is C. Wait, the answer is D") == "D"
    assert science_reward(prompts=["q"], completions=["\\boxed{B}"], gold=["B"], source=["math"]) == [None]
