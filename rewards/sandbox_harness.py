"""Test harness run inside the sandbox: it, not the submitted program, decides which tests pass.

The file is standalone (standard library only) because the sandbox holds the interpreter and the two
files of the harness, not the project. It reads the job as JSON on stdin (nonce, solution, tests,
limits), lowers its own resource limits, makes itself non-dumpable so that no other process in the
sandbox can read its memory or file descriptors, and prints ``<nonce> <json list of bools>`` as its
last act. The nonce comes from the caller and never reaches the solution's process, so nothing the
solution prints can pass for the verdict. In the sandbox it is the pid namespace's init, so the
solution cannot kill or stop it either, and it can see and kill every process the solution starts: it
stops a test whose processes exceed the task or memory budget, and clears the sandbox after each.
Each test runs in a fresh interpreter, ``sandbox_child.py`` beside this file, which executes the
solution and evaluates the test's solution-dependent expressions, writing each value as tagged plain
data (read back here by ``decode``).

Each ``assert`` is taken apart with ``ast``: its comparisons, operators, displays and calls of
builtins or standard-library functions run here, and only the smallest pieces that need the
solution (typically ``f(args)``) run in the child and come back as plain data (None, bool, int,
float, complex, str, bytes, list, tuple, set, frozenset, dict; an iterator comes back as an
iterator over its items). A call that hands the solution's functions or a generator expression to a
trusted function (``map(f, xs)``, ``all(f(x) for x in xs)``) runs in the child as a whole, so the
comparisons inside it are only as trustworthy as the solution. Otherwise an object with a rigged
``__eq__`` cannot even cross the boundary, patching ``math.isclose`` in the solution changes nothing
here, and ``==`` (and ``is``, as identities do not cross either) also requires identical types, so
``1 == 1.0`` does not pass. A program that exits or crashes early leaves its tests failed, as does
a test that is not a single ``assert`` statement.
"""

from __future__ import annotations

import ast
import builtins
import ctypes
import importlib
import json
import marshal
import math
import operator
import os
import resource
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import IO, Any

_PR_SET_DUMPABLE = 4
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)
_WATCH_SECONDS = 0.01
_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
# The base interpreter's site-packages, which a child adds to its path itself: it starts without the site
# module, whose .pth files may import packages at every start of an interpreter.
_SITE_DIRS = [d for d in site.getsitepackages() if os.path.isdir(d)]
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert,
}
_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.LShift: operator.lshift, ast.RShift: operator.rshift, ast.BitOr: operator.or_,
    ast.BitXor: operator.xor, ast.BitAnd: operator.and_, ast.MatMult: operator.matmul,
}
_DISPLAY: dict[type[ast.expr], type] = {ast.List: list, ast.Tuple: tuple, ast.Set: set}
_NOT_DATA = (ast.Name, ast.Attribute, ast.Lambda, ast.GeneratorExp)


def decode(node: Any) -> Any:
    """Inverse of ``sandbox_child.encode``, for trusted use; malformed input raises and fails the test."""
    tag, *rest = node
    if tag == "none":
        return None
    if tag == "bool" and type(rest[0]) is bool:
        return rest[0]
    if tag == "int":
        return int(rest[0])
    if tag == "float":
        return float(rest[0])
    if tag == "complex":
        return complex(float(rest[0]), float(rest[1]))
    if tag == "str" and type(rest[0]) is str:
        return rest[0]
    if tag == "bytes":
        return bytes.fromhex(rest[0])
    containers = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
    if tag in containers:
        return containers[tag](decode(item) for item in rest[0])
    if tag == "dict":
        return {decode(k): decode(v) for k, v in rest[0]}
    if tag == "iterator":
        return iter([decode(item) for item in rest[0]])
    raise ValueError(f"bad value tag {tag!r}")


def strict_equal(left: Any, right: Any) -> bool:
    """``left == right`` with the same type (1 == 1.0 and True == 1 do not count)."""
    return type(left) is type(right) and left == right


def bound_names(solution: str) -> set[str] | None:
    """Every name the solution binds anywhere; None when that cannot be known (star import, bad syntax).

    ``import math`` still leaves ``math`` trusted (it is the standard module); any other binding,
    even a local one, makes the name the solution's, which only moves work into the child.
    """
    try:
        tree = ast.parse(solution)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    return None
                top = alias.name.split(".")[0]
                if isinstance(node, ast.ImportFrom) or alias.asname or top not in sys.stdlib_module_names:
                    names.add(alias.asname or top)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
    return names


class Planner:
    """Splits a test expression into a tree evaluated here and solution-dependent leaves for the child.

    Operators, comparisons, displays and calls of trusted functions are taken apart recursively, so
    the child only evaluates the smallest pieces that need the solution (typically ``f(args)``) and
    cannot influence how the test combines them, e.g. by patching ``math.isclose`` or ``sorted``.
    """

    def __init__(self, solution_names: set[str] | None) -> None:
        known = set(dir(builtins)) | set(sys.stdlib_module_names)
        self.trusted = set() if solution_names is None else known - solution_names
        self.child_nodes: list[ast.expr] = []

    def is_trusted(self, node: ast.AST) -> bool:
        """Whether every free name in ``node`` is a builtin or standard module the solution left alone."""
        loaded = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        local = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        local |= {a.arg for n in ast.walk(node) if isinstance(n, ast.Lambda) for a in ast.walk(n.args)
                  if isinstance(a, ast.arg)}
        return (loaded - local) <= self.trusted

    def plan(self, node: ast.expr) -> tuple[Any, ...]:
        if self.is_trusted(node):
            return ("here", ast.unparse(node))
        if isinstance(node, ast.Compare):
            return ("compare", [self.plan(n) for n in [node.left, *node.comparators]], node.ops)
        if isinstance(node, ast.BoolOp):
            return ("boolop", isinstance(node.op, ast.And), [self.plan(n) for n in node.values])
        if isinstance(node, ast.UnaryOp):
            return ("unary", _UNARY[type(node.op)], self.plan(node.operand))
        if isinstance(node, ast.BinOp):
            return ("binop", _BINARY[type(node.op)], self.plan(node.left), self.plan(node.right))
        if (isinstance(node, ast.Call) and self.is_trusted(node.func)
                and not any(isinstance(a, ast.Starred) for a in node.args)
                and all(k.arg is not None for k in node.keywords)):
            mark = len(self.child_nodes)
            call = ("call", self.plan(node.func), [self.plan(a) for a in node.args],
                    {k.arg: self.plan(k.value) for k in node.keywords})
            # A function, class or lazy generator passed in (map(f, xs), sorted(xs, key=f)) cannot
            # cross as data, so such a call runs in the child as a whole.
            if not any(isinstance(n, _NOT_DATA) for n in self.child_nodes[mark:]):
                return call
            del self.child_nodes[mark:]
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)) and not any(
                isinstance(e, ast.Starred) for e in node.elts):
            return ("display", _DISPLAY[type(node)], [self.plan(e) for e in node.elts])
        if isinstance(node, ast.Dict) and None not in node.keys:
            return ("dict", [(self.plan(k), self.plan(v)) for k, v in zip(node.keys, node.values)])
        self.child_nodes.append(node)
        return ("child", len(self.child_nodes) - 1)


def evaluate_here(source: str) -> Any:
    """Evaluate trusted test code (builtins and standard modules only) in this process."""
    tree = ast.parse(source, mode="eval")
    namespace: dict[str, Any] = {"__builtins__": builtins}
    for name in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}:
        if not hasattr(builtins, name) and name in sys.stdlib_module_names:
            namespace[name] = importlib.import_module(name)
    return eval(compile(tree, "<test>", "eval"), namespace)


def resolve(plan: tuple[Any, ...], values: list[Any]) -> Any:
    """The value of a planned expression, with Python's evaluation order and short-circuiting.

    A child value that failed raises (failing the test) only when it is actually needed.
    """
    kind = plan[0]
    if kind == "here":
        return evaluate_here(plan[1])
    if kind == "child":
        status, *payload = values[plan[1]]
        if status != "ok":
            raise RuntimeError(f"expression failed in the solution: {payload}")
        return decode(payload[0])
    if kind == "boolop":
        value: Any = plan[1]
        for operand in plan[2]:
            value = resolve(operand, values)
            if bool(value) is not plan[1]:
                return value
        return value
    if kind == "unary":
        return plan[1](resolve(plan[2], values))
    if kind == "binop":
        return plan[1](resolve(plan[2], values), resolve(plan[3], values))
    if kind == "call":
        function = resolve(plan[1], values)
        args = [resolve(arg, values) for arg in plan[2]]
        return function(*args, **{key: resolve(arg, values) for key, arg in plan[3].items()})
    if kind == "display":
        return plan[1](resolve(element, values) for element in plan[2])
    if kind == "dict":
        return {resolve(key, values): resolve(value, values) for key, value in plan[1]}
    left = resolve(plan[1][0], values)
    for op, operand in zip(plan[2], plan[1][1:]):
        right = resolve(operand, values)
        if not _compare(op, left, right):
            return False
        left = right
    return True


def _compare(op: ast.cmpop, left: Any, right: Any) -> bool:
    """One comparison; ``==``/``is`` demand equal types as well as equal values."""
    if isinstance(op, (ast.Eq, ast.Is)):
        return strict_equal(left, right)
    if isinstance(op, (ast.NotEq, ast.IsNot)):
        return not strict_equal(left, right)
    return bool(_COMPARE[type(op)](left, right))


def run_child(solution: str, exprs: list[str], timeout: float, cpu_seconds: int,
              watch: dict[str, int] | None) -> list[Any] | None:
    """Run one child; its records, or None when the solution did not even load in time.

    With ``watch`` (only as the sandbox's init) the run is also stopped once the sandbox holds more
    than ``watch["tasks"]`` tasks or ``watch["resident_bytes"]`` of memory, and every process the
    solution started is killed afterwards, so no test inherits one from the test before.
    """
    def prepare_child() -> None:
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (min(cpu_seconds, hard), hard))
        _LIBC.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)

    job = {"solution": solution, "exprs": exprs, "site_dirs": _SITE_DIRS}
    with open(os.devnull, "wb") as sink, tempfile.TemporaryFile() as result:
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", "-S", _CHILD], stdin=subprocess.PIPE,
            stdout=result, stderr=sink, env={}, start_new_session=True, preexec_fn=prepare_child)
        feeder = threading.Thread(target=_feed, args=(process.stdin, marshal.dumps(job)), daemon=True)
        feeder.start()
        try:
            _wait(process, timeout, watch)
        finally:
            _kill_group(process)
            if watch is not None:
                _clear_namespace()
            feeder.join()  # the child is gone, so a pending write fails at once
        result.seek(0)
        lines = result.read(1 << 20).decode("utf-8", "replace").splitlines()
    records = []
    for line in lines:
        try:
            records.append(ast.literal_eval(line))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            records.append(["error", "bad record"])
    if not records or records[0] != ["loaded"]:
        return None
    return records[1:] + [["error", "no value"]] * (len(exprs) - len(records) + 1)


def _feed(stream: IO[bytes], job: bytes) -> None:
    """Write the child's job to its stdin and close it; a child that died early is no error here."""
    try:
        with stream:
            stream.write(job)
    except BrokenPipeError:
        pass


def _wait(process: subprocess.Popen[bytes], timeout: float, watch: dict[str, int] | None) -> None:
    """Wait up to ``timeout`` s for the child, checking the sandbox's usage every 10 ms under ``watch``.

    RLIMIT_NPROC does not bind a sandbox started by root (its uid maps back to uid 0, which the
    kernel exempts) and RLIMIT_AS is per process, so a fork bomb, or many processes each filling
    memory, would otherwise only be bounded by the deadline.
    """
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            process.wait(timeout=left if watch is None else min(left, _WATCH_SECONDS))
            return
        except subprocess.TimeoutExpired:
            pass
        if watch is not None:
            tasks, resident = namespace_usage()
            if tasks > watch["tasks"] or resident > watch["resident_bytes"]:
                return


def namespace_usage() -> tuple[int, int]:
    """Tasks (threads included) and resident bytes of every process in the sandbox but this one.

    Only meaningful as the pid namespace's init, where ``/proc`` shows nothing but the sandbox.
    """
    tasks = resident = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or entry.name == "1":
            continue
        try:
            tasks += len(os.listdir(f"/proc/{entry.name}/task"))
            with open(f"/proc/{entry.name}/statm") as handle:
                resident += int(handle.read().split()[1]) * _PAGE_BYTES
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
    return tasks, resident


def _clear_namespace() -> None:
    """Kill every other process of the sandbox and reap them all, orphans included.

    As the pid namespace's init, kill(-1) reaches exactly the sandbox's other processes, including
    any that left the child's process group with setsid(); orphans are re-parented to this process,
    so waiting until there are no children left reaps every one.
    """
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill the child's process group, including anything the solution left running in it."""
    try:
        os.killpg(process.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def judge(job: dict[str, Any]) -> list[bool]:
    """Pass/fail per test; once the solution fails to load, the remaining tests fail unrun."""
    solution: str = job["solution"]
    names = bound_names(solution)
    cpu_seconds = max(1, math.ceil(job["test_timeout"]))
    # Defence in depth: kill(-1) is only ever sent as the init of the sandbox's pid namespace.
    watch = job["watch"] if job["watch"] is not None and os.getpid() == 1 else None
    passed: list[bool] = []
    loads = True
    for test in job["tests"]:
        planner = Planner(names)
        try:
            statements = ast.parse(test).body
            if len(statements) != 1 or not isinstance(statements[0], ast.Assert):
                raise ValueError("a test must be one assert statement")
            plan = planner.plan(statements[0].test)
        except (SyntaxError, ValueError, RecursionError):
            passed.append(False)
            continue
        exprs = [ast.unparse(node) for node in planner.child_nodes]
        values: list[Any] | None = []
        if exprs:
            values = run_child(solution, exprs, job["test_timeout"], cpu_seconds, watch) if loads else None
        if values is None:
            loads = False
            passed.append(False)
            continue
        try:
            passed.append(bool(resolve(plan, values)))
        except Exception:  # noqa: BLE001 - a test that cannot be evaluated fails
            passed.append(False)
    return passed


def limit_self(limits: dict[str, int]) -> None:
    """Resource limits for this process and, by inheritance, every child; no core dumps."""
    for name, value in (("RLIMIT_AS", limits["memory_bytes"]), ("RLIMIT_NOFILE", limits["open_files"]),
                        ("RLIMIT_FSIZE", limits["file_size_bytes"]), ("RLIMIT_NPROC", limits["processes"]),
                        ("RLIMIT_CPU", limits["cpu_seconds"]), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def main() -> None:
    # In the sandbox this process is the pid namespace's init, which the kernel shields from every
    # signal sent from inside the namespace that has no handler; dropping Python's SIGINT handler
    # leaves the solution no way to kill or stop the harness.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    job = json.loads(sys.stdin.buffer.read())
    limit_self(job["limits"])
    if _LIBC.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    verdict = judge(job)
    sys.stdout.write(f"{job['nonce']} {json.dumps(verdict)}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
