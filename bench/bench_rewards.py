"""Reward scoring throughput on this machine: math (math-verify in worker processes) and code (sandbox).

The completions are built from the embedded generators' held-out rows, so they look like the
pipeline's own: math cycles through correct, wrong, unboxed and malformed-LaTeX answers; code mixes
the reference solutions, wrong ones and a few infinite loops (each costs its tests' full timeouts).
The math worker pool is started and the sandbox probed before the timed batches.

    python -m bench.bench_rewards                       # 512 math and 256 code completions
    python -m bench.bench_rewards --math 2048 --code 0
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

from bench.common import header, timed
from data_blends import generators
from rewards import code_reward, math_reward, summarize
from rewards.code import CodeRewardConfig, require_sandbox
from rewards.math import DEFAULT_TIMEOUT

_WRONG_CODE = "```python\ndef {name}(*args):\n    return None\n```"
_LOOP_CODE = "```python\ndef {name}(*args):\n    while True:\n        pass\n```"


def math_batch(n: int) -> tuple[list[str], list[str], list[str], list[str]]:
    """Prompts, completions, golds and kinds: correct, wrong, unboxed and malformed in turn."""
    rows = generators.generate("math", "test", n)
    kinds = [("correct", "wrong", "unboxed", "malformed")[i % 4] for i in range(n)]
    answers = {
        "correct": lambda row: row["answer"],
        "wrong": lambda row: f"The answer is \\boxed{{{row['gold']}1}}.",
        "unboxed": lambda row: f"The answer is {row['gold']}.",
        "malformed": lambda row: f"The answer is \\boxed{{\\frac{{{row['gold']}}}{{}}^}}.",
    }
    completions = [f"<think>{row['thinking']}</think>{answers[kind](row)}" for row, kind in zip(rows, kinds)]
    return [row["prompt"] for row in rows], completions, [row["gold"] for row in rows], kinds


def code_batch(n: int, loops: int) -> tuple[list[str], list[str], list[list[str]], list[str]]:
    """Prompts, completions, tests and kinds: ``loops`` infinite loops spread out, else reference or wrong."""
    rows = generators.generate("code", "test", n)
    loop_at = {i * n // loops for i in range(loops)} if loops else set()
    kinds = ["infinite loop" if i in loop_at else ("reference", "wrong")[i % 2] for i in range(n)]
    completions = []
    for row, kind in zip(rows, kinds):
        name = row["tests"][0].split()[1].split("(")[0]  # "assert f(3) == 4" -> "f"
        code = {"reference": row["answer"], "wrong": _WRONG_CODE.format(name=name),
                "infinite loop": _LOOP_CODE.format(name=name)}[kind]
        completions.append(f"<think>{row['thinking']}</think>{code}")
    return [row["prompt"] for row in rows], completions, [row["tests"] for row in rows], kinds


def report(label: str, run: Callable[[], list[float | None]], kinds: list[str]) -> None:
    """Time one batch and print its rate, its wall time and what it scored."""
    scores, seconds = timed(run)
    n = len(scores)
    mix = ", ".join(f"{count} {kind}" for kind, count in Counter(kinds).items())
    stats = summarize(scores)
    print(f"{label}: {n} completions ({mix})")
    print(f"  wall {seconds:.2f} s, {n / seconds:.1f} items/s, {1000 * seconds / n:.1f} ms/item; "
          f"mean reward {stats['mean']:.3f}, unscorable {stats['unscorable']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--math", type=int, default=512, help="math completions (0 skips math)")
    parser.add_argument("--code", type=int, default=256, help="code completions (0 skips code)")
    parser.add_argument("--code-loops", type=int, default=4, help="code completions that loop forever")
    args = parser.parse_args()
    config = CodeRewardConfig()
    print(header(f"reward scoring: {args.math} math and {args.code} code completions"))
    print(f"# math: {DEFAULT_TIMEOUT:.0f} s deadline per verification; code: {config.workers} sandboxes "
          f"at a time, {config.limits.test_timeout:.0f} s per test")
    if args.math:
        prompts, completions, golds, kinds = math_batch(args.math)
        _, warmup = timed(lambda: math_reward(prompts=prompts[:1], completions=completions[:1],
                                              gold=golds[:1]))
        print(f"math workers started in {warmup:.2f} s (not counted)")
        report("math", lambda: math_reward(prompts=prompts, completions=completions, gold=golds), kinds)
    if args.code:
        prompts, completions, tests, kinds = code_batch(args.code, min(args.code_loops, args.code))
        _, warmup = timed(lambda: require_sandbox(config))
        print(f"sandbox probed in {warmup:.2f} s (not counted)")
        report("code", lambda: code_reward(prompts=prompts, completions=completions, tests=tests,
                                           config=config), kinds)


if __name__ == "__main__":
    main()
