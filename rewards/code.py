"""Code reward: the answer's last ```python block run against the row's assert tests in a sandbox.

Generated code is untrusted, so it only ever runs inside ``rewards.sandbox`` (bubblewrap). Without a
working bwrap the reward refuses to run unless the caller explicitly opts into unsandboxed
execution. Completions of a batch are scored in parallel, one sandbox per distinct program.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rewards.common import answer_text, applies, column
from rewards.sandbox import SandboxLimits, run_tests, sandbox_problem

log = logging.getLogger(__name__)

_CODE_BLOCK = re.compile(r"```python[^\S\n]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class CodeRewardConfig:
    """How code is scored.

    ``all_or_nothing`` gives 1.0 only when every test passes (pass@1 style) instead of the fraction.
    ``allow_unsandboxed`` runs code without bwrap when bwrap is unusable; it gives no isolation and
    is meant for trusted code on machines without user namespaces, never for training on model output.
    """

    all_or_nothing: bool = False
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    workers: int = min(8, os.cpu_count() or 1)
    allow_unsandboxed: bool = False
    bwrap: str = "bwrap"


def extract_code(answer: str) -> str | None:
    """The last fenced ```python block of the answer (an unclosed block does not count)."""
    blocks = _CODE_BLOCK.findall(answer)
    return blocks[-1] if blocks else None


def require_sandbox(config: CodeRewardConfig) -> bool:
    """Whether to sandbox; raises when bwrap is unusable and unsandboxed runs were not allowed."""
    problem = sandbox_problem(config.bwrap)
    if problem is None:
        return True
    if config.allow_unsandboxed:
        return False
    raise RuntimeError(
        f"the code reward needs a working bubblewrap sandbox: {problem}. Install bubblewrap "
        "(apt-get install bubblewrap) on a kernel that allows user namespaces, or pass "
        "CodeRewardConfig(allow_unsandboxed=True) to run generated code without isolation."
    )


def code_reward(prompts: Sequence[Any], completions: Sequence[Any], tests: Sequence[Sequence[str]], *,
                config: CodeRewardConfig | None = None, **kwargs: Any) -> list[float | None]:
    """Fraction of ``tests`` passed (or all-or-nothing); ``None`` when not scored.

    No code block scores 0.0. A test that fails, raises or exceeds ``limits.test_timeout`` counts as
    failed, so an infinite loop scores 0.0; ``None`` marks rows of another ``source`` or without
    tests, and runs that produced no verdict within ``limits.wall_timeout`` or hit a sandbox failure.
    """
    config = config or CodeRewardConfig()
    sandboxed = require_sandbox(config)
    size = len(completions)
    test_lists = column(tests, size, "tests")
    sources = column(kwargs.get("source"), size, "source")

    scores: list[float | None] = [None] * size
    runs: dict[tuple[str, tuple[str, ...]], list[int]] = {}  # (code, tests) -> the rows that share them
    for index in range(size):
        if not applies(sources[index], "code") or not test_lists[index]:
            continue
        code = extract_code(answer_text(completions[index]))
        if code is None:
            scores[index] = 0.0
        else:  # a group of samples often repeats itself: the same code under the same tests runs once
            runs.setdefault((code, tuple(test_lists[index])), []).append(index)

    def score(run: tuple[str, tuple[str, ...]]) -> float | None:
        code, tests_of_run = run
        try:
            passed = run_tests(code, list(tests_of_run), config.limits, bwrap=config.bwrap, sandboxed=sandboxed)
        except Exception:  # noqa: BLE001 - a failure to run is "not scored", never a trainer crash
            log.exception("running the tests of completion %d failed", runs[run][0])
            return None
        if passed is None:
            return None
        if config.all_or_nothing:
            return float(all(passed))
        return sum(passed) / len(passed)

    with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
        for rows, value in zip(runs.values(), pool.map(score, runs)):
            for index in rows:
                scores[index] = value
    return scores
