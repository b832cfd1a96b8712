"""Code reward and its bubblewrap sandbox: scoring, reward-hacking attempts, and escape attempts."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

import rewards.code
from rewards.code import CodeRewardConfig, code_reward, extract_code
from rewards.sandbox import SandboxLimits, python_executable, run_tests, sandbox_problem
from rewards.sandbox_harness import Planner, bound_names

needs_sandbox = pytest.mark.skipif(sandbox_problem() is not None, reason=f"no sandbox: {sandbox_problem()}")

FAST = CodeRewardConfig(limits=SandboxLimits(test_timeout=1.0, wall_timeout=20.0))
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]
HACK_TESTS = ADD_TESTS + ["assert math.isclose(add(0.1, 0.2), 0.3)", "assert sorted([add(3, 0)]) == [3]"]


def fenced(code: str) -> str:
    return f"<think>plan</think>Here it is:\n```python\n{textwrap.dedent(code).strip()}\n```"


def score(code: str, tests: list[str], config: CodeRewardConfig = FAST) -> float | None:
    return code_reward(prompts=["p"], completions=[fenced(code)], tests=[tests], config=config)[0]


def running_here(cmdline: bytes) -> bool:
    """Whether any process on this machine, sandboxed ones included, has exactly this command line."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path("/proc", pid, "cmdline").read_bytes() == cmdline:
                return True
        except OSError:  # it exited meanwhile
            continue
    return False


def test_extract_code_takes_the_last_closed_python_block() -> None:
    answer = "```python\nfirst\n```\ntext\n```python\nsecond\n```\n```python\nunclosed"
    assert extract_code(answer) == "second\n"
    assert extract_code("```\nno language\n```") is None


@pytest.mark.parametrize(("test", "sent"), [
    ("assert add(1, 2) == 3", ["add(1, 2)"]),
    ("assert math.isclose(add(0.1, 0.2), 0.3)", ["add(0.1, 0.2)"]),  # isclose runs in the harness
    ("assert abs(add(1, 1) - 2) < 1e-9 and sorted(items()) == [1]", ["add(1, 1)", "items()"]),
    ("assert list(map(add, [1], [2])) == [3]", ["map(add, [1], [2])"]),  # a function cannot cross
    ("assert all(add(i, 0) == i for i in range(3))", ["all((add(i, 0) == i for i in range(3)))"]),
    ("assert sorted([3, 1]) == [1, 3]", []),
])
def test_harness_sends_only_solution_dependent_pieces_to_the_solution(test: str, sent: list[str]) -> None:
    planner = Planner(bound_names("import math\ndef add(a, b): return a + b\ndef items(): return [1]"))
    planner.plan(ast.parse(test).body[0].test)
    assert [ast.unparse(node) for node in planner.child_nodes] == sent


def test_harness_distrusts_names_the_solution_rebinds() -> None:
    assert bound_names("from math import *") is None
    names = bound_names("import math, numpy\nimport os.path as osp\nsorted = 1\ndef f(len): pass")
    assert names == {"numpy", "osp", "sorted", "f", "len"}  # plain "import math" keeps math trusted


def test_missing_sandbox_raises_unless_unsandboxed_is_allowed() -> None:
    broken = CodeRewardConfig(bwrap="/nonexistent/bwrap", limits=FAST.limits)
    with pytest.raises(RuntimeError, match="bubblewrap"):
        score("def add(a, b): return a + b", ADD_TESTS, broken)
    opted_in = CodeRewardConfig(bwrap="/nonexistent/bwrap", limits=FAST.limits, allow_unsandboxed=True)
    assert score("def add(a, b): return a + b", ADD_TESTS, opted_in) == 1.0


@needs_sandbox
def test_correct_wrong_partial_and_all_or_nothing() -> None:
    completions = [
        fenced("def add(a, b):\n    return a + b"),
        fenced("def add(a, b):\n    return a - b"),
        fenced("def add(a, b):\n    return a + b if a > 0 else 99"),  # passes 2 of 3
        "```python\ndef add(a, b): return 0\n```\nfixed:\n```python\ndef add(a, b): return a + b\n```",
        "no code at all",
    ]
    assert code_reward(prompts=["p"] * 5, completions=completions, tests=[ADD_TESTS] * 5,
                       config=FAST) == [1.0, 0.0, pytest.approx(2 / 3), 1.0, 0.0]
    strict = CodeRewardConfig(all_or_nothing=True, limits=FAST.limits)
    assert code_reward(prompts=["p"], completions=[completions[2]], tests=[ADD_TESTS], config=strict) == [0.0]


@needs_sandbox
def test_rows_without_tests_or_of_other_sources_are_not_scored() -> None:
    scores = code_reward(prompts=["p"] * 2, completions=[fenced("x = 1")] * 2, tests=[[], ADD_TESTS],
                         source=["code", "math"], config=FAST)
    assert scores == [None, None]


@needs_sandbox
def test_assert_forms() -> None:
    code = """
        import math
        def half(x):
            return x / 2
        def items():
            return [3, 1, 2]
    """
    tests = [
        "assert math.isclose(half(0.3), 0.15)",
        "assert sorted(items()) == [1, 2, 3]",
        "assert half(4) == 2.0",
        "assert half(4) == 2",  # 2.0 is not an int: == also compares types
        "assert not half(0)",
        "assert 1 < half(3) <= 1.5",
        "assert len(items()) == 3",
        "assert abs(half(1) - 0.5) < 1e-9 and isinstance(items(), list)",
        "assert type(half(1)) is float",
        "assert {'n': half(2)} == {'n': 1.0}",
        "x = half(2)",  # not an assert statement: fails
    ]
    assert score(code, tests) == pytest.approx(9 / 11)


@needs_sandbox
def test_tests_that_pass_functions_and_generators() -> None:
    code = """
        LIMIT = 5
        def double(x):
            return 2 * x
        def count():
            yield from range(3)
        class Box:
            pass
    """
    tests = [
        "assert list(map(double, [1, 2])) == [2, 4]",
        "assert all(double(i) == 2 * i for i in range(3))",
        "assert sorted([1, 3, 2], key=double) == [1, 2, 3]",
        "assert next(count()) == 0 and list(count()) == [0, 1, 2]",
        "assert isinstance(Box(), Box)",
        "assert LIMIT == 5",
    ]
    assert score(code, tests) == 1.0


@needs_sandbox
def test_a_large_solution_reaches_every_test_whole() -> None:
    padding = "# " + "x" * (4 << 20) + "\n"  # far more than a pipe holds
    assert score(padding + "def add(a, b):\n    return a + b", ADD_TESTS) == 1.0


@needs_sandbox
def test_infinite_loops_fail_within_the_deadline() -> None:
    start = time.monotonic()
    assert score("def add(a, b):\n    while True:\n        pass", ADD_TESTS) == 0.0  # each test times out
    assert score("while True:\n    pass\ndef add(a, b): return a + b", ADD_TESTS) == 0.0  # hangs on import
    assert time.monotonic() - start < 8
    whole_run = CodeRewardConfig(limits=SandboxLimits(test_timeout=30.0, wall_timeout=1.5))
    start = time.monotonic()
    assert score("def add(a, b):\n    while True:\n        pass", ADD_TESTS, whole_run) is None
    assert time.monotonic() - start < 3


@needs_sandbox
@pytest.mark.parametrize("code", [
    "import os\nos._exit(0)",  # exit before any test runs
    "import os\ndef add(a, b):\n    os._exit(0)",  # exit inside the call
    "import sys\ndef add(a, b):\n    sys.exit(0)",
    "print('PASSED 3/3')\nprint('[\"loaded\"]')\nprint(True)\ndef add(a, b): return None",  # fake output
    textwrap.dedent("""
        class Anything:
            def __eq__(self, other):
                return True
            def __ne__(self, other):
                return False
        def add(a, b):
            return Anything()
    """),
    textwrap.dedent("""
        class Sneaky(int):
            def __eq__(self, other):
                return True
        def add(a, b):
            return Sneaky(0)
    """),
    textwrap.dedent("""
        import os, signal
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP):
            for pid in (1, os.getppid()):
                os.kill(pid, sig)  # the harness is the namespace's init: these are ignored
        def add(a, b):
            return None
    """),
    textwrap.dedent("""
        import builtins, math
        builtins.sorted = lambda *a, **k: [3]
        math.isclose = lambda *a, **k: True
        def add(a, b):
            return None
    """),
    textwrap.dedent("""
        import os
        def add(a, b):  # records that are code, not literals, into the child's record stream
            for fd in range(3, 64):
                try:
                    os.write(fd, b"__import__('os').kill(1, 9)\\n['ok', ['int', str(a + b)]]\\n")
                except OSError:
                    pass
            return None
    """),
])
def test_reward_hacks_score_zero(code: str) -> None:
    assert score(code, HACK_TESTS) == 0.0


@needs_sandbox
def test_an_honest_solution_passes_the_hack_tests() -> None:
    assert score("def add(a, b):\n    return a + b", HACK_TESTS) == 1.0


@needs_sandbox
def test_environment_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARD_TEST_SECRET", "hunter2")
    code = """
        import os
        def secret_seen():
            found = any("hunter2" in value for value in os.environ.values())
            for pid in os.listdir("/proc"):
                try:
                    with open(f"/proc/{pid}/environ", "rb") as handle:
                        found = found or b"hunter2" in handle.read()
                except OSError:
                    pass
            return found
        def variables():
            return sorted(os.environ)
    """
    tests = ["assert secret_seen() == False", "assert 'REWARD_TEST_SECRET' not in variables()"]
    assert score(code, tests) == 1.0


@needs_sandbox
def test_harness_process_is_out_of_reach() -> None:
    code = """
        import os
        def attempts():
            denied = 0
            for path, mode in [("/proc/1/mem", "rb"), ("/proc/1/environ", "rb"), ("/proc/1/fd/0", "rb"),
                               ("/proc/1/fd/1", "wb"), ("/proc/1/maps", "rb")]:
                try:
                    with open(path, mode) as handle:
                        handle.read(1) if "r" in mode else handle.write(b"x")
                except OSError:
                    denied += 1
            return denied
    """
    assert score(code, ["assert attempts() == 5"]) == 1.0


@needs_sandbox
def test_network_is_unreachable() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f"""
            import socket
            def connect():
                try:
                    socket.create_connection(("127.0.0.1", {port}), timeout=1).close()
                    return "connected"
                except OSError:
                    return "blocked"
        """
        assert score(code, ["assert connect() == 'blocked'"]) == 1.0


@needs_sandbox
def test_filesystem_is_read_only_outside_private_tmp(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    own_source = Path(rewards.code.__file__).resolve()
    code = """
        def write(path):
            try:
                with open(path, "w") as handle:
                    handle.write("x")
                return "written"
            except OSError:
                return "denied"
        def read(path):
            try:
                with open(path) as handle:
                    return handle.read()[:10]
            except OSError:
                return "denied"
    """
    tests = [
        f"assert write({str(target)!r}) == 'denied'",
        "assert write('/usr/escaped.txt') == 'denied'",
        "assert write('/tmp/inside.txt') == 'written'",
        f"assert read({str(own_source)!r}) == 'denied'",  # the project is not visible
    ]
    assert score(code, tests) == 1.0
    assert not target.exists()


@needs_sandbox
def test_shell_and_subprocess_cannot_escape(tmp_path: Path) -> None:
    via_system, via_subprocess = tmp_path / "system.txt", tmp_path / "subprocess.txt"
    code = f"""
        import posix, importlib
        posix.system("echo pwned > {via_system}")
        subprocess = importlib.import_module("subprocess")
        subprocess.run(["/bin/sh", "-c", "touch {via_subprocess}"])
        def ran():
            return posix.system("echo inside > /tmp/ok.txt") == 0
    """
    assert score(code, ["assert ran() == True"]) == 1.0  # the shell runs, but only in the sandbox
    assert not via_system.exists() and not via_subprocess.exists()


@needs_sandbox
def test_memory_is_limited() -> None:
    code = """
        def allocate():
            try:
                return len(bytearray(8 << 30))
            except MemoryError:
                return -1
    """
    assert score(code, ["assert allocate() == -1"]) == 1.0


# Started by root, the sandbox's uid maps back to root, which RLIMIT_NPROC does not bind; these are
# stopped by the harness's watch on the sandbox's tasks and memory, long before the test deadline.
BOMB_LIMITS = CodeRewardConfig(limits=SandboxLimits(test_timeout=5.0, wall_timeout=30.0))


@needs_sandbox
@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",
    textwrap.dedent("""
        import os
        def add(a, b):
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
    """),
    textwrap.dedent("""
        import threading, time
        threading.stack_size(32768)  # small stacks, so RLIMIT_AS allows thousands of threads
        def add(a, b):
            while True:
                threading.Thread(target=time.sleep, args=(60,)).start()
    """),
    textwrap.dedent("""
        import os, time
        def add(a, b):
            for _ in range(4):
                os.fork()
            hog = b"x" * (512 << 20)  # 16 processes, each within RLIMIT_AS: 8 GB in all
            time.sleep(60)
    """),
    textwrap.dedent("""
        def add(a, b):
            hog = []
            while True:
                hog.append(b"x" * (64 << 20))
    """),
], ids=["fork bomb", "fork bomb in the call", "thread bomb", "memory bomb in many processes", "memory bomb"])
def test_fork_and_memory_bombs_are_stopped(code: str) -> None:
    start = time.monotonic()
    assert score(code, ADD_TESTS[:1], BOMB_LIMITS) == 0.0
    assert time.monotonic() - start < BOMB_LIMITS.limits.test_timeout  # stopped before its deadline


@needs_sandbox
@pytest.mark.parametrize("code", [
    "import sys\nwhile True:\n    sys.stdout.write('x' * (1 << 20))\n    sys.stderr.write('y' * (1 << 20))",
    textwrap.dedent("""
        import os
        def add(a, b):
            for fd in range(64):  # the child's record stream included
                try:
                    os.write(fd, b"x" * (32 << 20))
                except OSError:
                    pass
            return a + b
    """),
    "import os, signal\nos.kill(-1, signal.SIGKILL)\ndef add(a, b): return a + b",  # everything it can reach
    "import os, signal\nos.killpg(0, signal.SIGKILL)\ndef add(a, b): return a + b",
], ids=["printing gigabytes", "writing to every descriptor", "kill all", "kill own group"])
def test_output_floods_and_kill_attempts_score_zero(code: str) -> None:
    assert score(code, ADD_TESTS[:1]) == 0.0  # and the harness survived to give that verdict


@needs_sandbox
def test_files_outside_the_sandbox_cannot_be_deleted(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    code = """
        import os, shutil
        def delete(path):
            try:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                return "deleted"
            except OSError:
                return "denied"
        def scratch():
            open("/tmp/scratch.txt", "w").close()
            return delete("/tmp/scratch.txt")
    """
    tests = [
        f"assert delete({str(victim)!r}) == 'denied'",
        f"assert delete({str(tmp_path)!r}) == 'denied'",
        "assert delete('/sandbox/harness.py') == 'denied'",  # read-only bind of the project's file
        "assert scratch() == 'deleted'",  # its own /tmp is writable
    ]
    assert score(code, tests) == 1.0
    assert victim.read_text() == "keep"


@needs_sandbox
def test_no_process_outlives_its_test_or_the_run() -> None:
    marker = f"{time.time_ns() % 10**9 + 10**6}"  # a sleep length no other process uses
    code = f"""
        import os, time
        def sleeper_running():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if open(f"/proc/{{pid}}/cmdline", "rb").read() == b"sleep\\x00{marker}\\x00":
                        return True
                except OSError:
                    pass
            return False
        def start_sleeper():
            if os.fork() == 0:
                os.setsid()  # out of the child's process group
                os.execv("/bin/sleep", ["sleep", "{marker}"])
            for _ in range(100):
                if sleeper_running():
                    return True
                time.sleep(0.01)
            return False
    """
    tests = ["assert start_sleeper() == True", "assert sleeper_running() == False"]
    assert score(code, tests) == 1.0  # started by one test, gone by the next
    assert not running_here(f"sleep\x00{marker}\x00".encode())  # and nothing is left on this machine


@needs_sandbox
def test_batch_is_scored_in_parallel() -> None:
    slow = [f"import time\ndef add(a, b):\n    time.sleep(0.8)  # copy {k}\n    return a + b" for k in range(4)]
    config = CodeRewardConfig(workers=4, limits=SandboxLimits(test_timeout=3.0, wall_timeout=20.0))
    start = time.monotonic()
    scores = code_reward(prompts=["p"] * 4, completions=[fenced(code) for code in slow], tests=[ADD_TESTS[:1]] * 4,
                         config=config)
    assert scores == [1.0] * 4
    assert time.monotonic() - start < 2.5  # serially it would take over 3.2 s


@needs_sandbox
def test_the_same_program_under_the_same_tests_runs_once(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[str] = []
    real_run = rewards.code.run_tests
    monkeypatch.setattr(rewards.code, "run_tests", lambda code, *a, **k: runs.append(code) or real_run(code, *a, **k))
    right, wrong = "def add(a, b):\n    return a + b", "def add(a, b):\n    return a * b + 1"
    completions = [fenced(right), fenced(wrong), fenced(right), fenced(right), fenced(wrong)]
    tests = [ADD_TESTS, ADD_TESTS, ADD_TESTS, ADD_TESTS[:1], ADD_TESTS]
    scores = code_reward(prompts=["p"] * 5, completions=completions, tests=tests, config=FAST)
    assert scores == [1.0, 2 / 3, 1.0, 1.0, 2 / 3]
    # the fourth row's tests differ, so it runs apart
    assert sorted(code.strip() for code in runs) == sorted([right, wrong, right])


@pytest.mark.parametrize("sandboxed", [pytest.param(True, marks=needs_sandbox), False])
def test_solutions_see_the_base_interpreters_site_packages(sandboxed: bool) -> None:
    """Each test's interpreter starts without the site module (the base interpreter's .pth files may
    import packages at every start) and puts the base interpreter's site-packages on its path itself,
    in site's order, so a solution imports what that interpreter has installed."""
    query = "import site, sys; print(repr([p for p in sys.path if p in site.getsitepackages()]))"
    base = subprocess.run([python_executable(), "-I", "-c", query], capture_output=True, env={}, check=True)
    expected = ast.literal_eval(base.stdout.decode())
    assert expected                          # every CPython install has a site-packages directory
    code = f"import sys\ndef site_dirs(): return [p for p in sys.path if p in {set(expected)!r}]"
    assert run_tests(code, [f"assert site_dirs() == {expected!r}"], FAST.limits, sandboxed=sandboxed) == [True]
