"""A test's child process in the sandbox: run the solution, then evaluate the test's expressions.

Started by the harness (``rewards/sandbox_harness.py``) as a fresh interpreter for each test, with
``-I -B -S``: no site module, so no ``.pth`` file of the base interpreter runs (some import packages at
startup, tens of milliseconds per interpreter), and no module beyond those built into the interpreter,
so that it is up in a fraction of the harness's start-up time (``json`` alone, through ``re``, would
double it). The job comes from the harness on stdin in ``marshal`` format; it names the base
interpreter's site-packages directories, which are added to ``sys.path`` before the solution runs, so
the solution imports what the base interpreter has installed as it would with ``site``. Values go back
as tagged plain data, one Python literal per line (``encode``), which the harness reads with
``ast.literal_eval`` and ``decode``: literals only, whatever the solution writes into the stream.
"""

from __future__ import annotations

import builtins
import marshal
import os
import sys
from collections.abc import Iterator

_MAX_DEPTH = 64
_MAX_ITEMS = 100_000


def encode(value: object, depth: int = 0, budget: list[int] | None = None) -> list[object]:
    """Tag plain data as nested lists of literals; exact types only, so subclasses with rigged methods do not pass."""
    budget = budget if budget is not None else [_MAX_ITEMS]
    budget[0] -= 1
    if depth > _MAX_DEPTH or budget[0] < 0:
        raise ValueError("value too large or too deep")
    kind = type(value)
    if value is None:
        return ["none"]
    if kind is bool:
        return ["bool", value]
    if kind is int:
        return ["int", str(value)]
    if kind is float:
        return ["float", repr(value)]
    if kind is complex:
        return ["complex", repr(value.real), repr(value.imag)]
    if kind is str:
        return ["str", value]
    if kind is bytes:
        return ["bytes", value.hex()]
    if kind in (list, tuple, set, frozenset):
        return [kind.__name__, [encode(item, depth + 1, budget) for item in value]]
    if kind is dict:
        return ["dict", [[encode(k, depth + 1, budget), encode(v, depth + 1, budget)]
                         for k, v in value.items()]]
    if isinstance(value, Iterator):  # a generator or map object: its items, as a fresh iterator
        return ["iterator", [encode(item, depth + 1, budget) for item in value]]
    raise TypeError(f"{kind.__name__} is not plain data")


def main() -> None:
    """Execute the solution, then evaluate each expression, one line per value on fd 1.

    The result stream is moved off fd 1/2 first so that the solution's own prints go to /dev/null,
    and the solution runs as module ``solution``, so its ``if __name__ == "__main__":`` demo code
    (which may read stdin) stays out of the way.
    """
    job = marshal.loads(sys.stdin.buffer.read())
    sys.path.extend(job["site_dirs"])
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    out = os.fdopen(os.dup(1), "w")
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)

    def emit(*record: object) -> None:
        out.write(repr(list(record)) + "\n")
        out.flush()

    namespace: dict[str, object] = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(job["solution"], "<solution>", "exec"), namespace)
    except BaseException as error:  # noqa: BLE001 - SystemExit at import is a failure too
        emit("load_error", type(error).__name__)
        return
    emit("loaded")
    for source in job["exprs"]:
        try:
            emit("ok", encode(eval(compile(source, "<test>", "eval"), namespace)))
        except BaseException as error:  # noqa: BLE001 - any failure fails the test
            emit("error", type(error).__name__)


if __name__ == "__main__":
    main()
