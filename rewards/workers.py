"""Worker processes that run calls under a hard per-call deadline.

math-verify bounds its own work with ``signal.alarm``, which only works in the main thread and cannot
interrupt a long C-level sympy computation. A trainer calls rewards from arbitrary threads, so the
verification runs in separate worker processes instead: a call that outlives its deadline has its
worker killed and yields ``None``, and a fresh worker takes its place.

Workers are started with ``subprocess`` running this module's ``serve`` (not ``multiprocessing``),
so starting one never re-imports the trainer's main script. Calls travel as pickles over a socket
pair: the function is pickled by reference, so it must be importable at module level.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger(__name__)

_SERVE = "import sys; from rewards.workers import serve; serve(int(sys.argv[1]), sys.argv[2])"


def serve(fd: int, warmup: str) -> None:
    """Worker loop: import ``warmup``, report ready, then run ``(fn, args)`` calls until told to stop.

    Stray prints from the called code would corrupt nothing (the socket is separate), but stdout is
    pointed at stderr anyway so that they do not interleave with the trainer's own output.
    """
    os.dup2(2, 1)
    conn = Connection(fd)
    if warmup:
        __import__(warmup)
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        fn, args = message
        try:
            conn.send(("ok", fn(*args)))
        except Exception as error:  # noqa: BLE001 - any failure of the call is reported, not raised
            conn.send(("error", f"{type(error).__name__}: {error}"))


class _Worker:
    """One worker process and the parent's end of its socket."""

    def __init__(self, warmup: str) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVE, str(child.fileno()), warmup],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        child.close()
        self.conn = Connection(parent.detach())
        self.started = time.monotonic()
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        """Kill the worker's process group (the call may have started children) and reap the worker.

        An already reaped worker is left alone, since its process id may have been reused.
        """
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.process.wait()
        self.conn.close()

    def stop(self) -> None:
        """Ask an idle worker to exit, then make sure it did."""
        try:
            self.conn.send(None)
            self.process.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class DeadlinePool:
    """A small pool of worker processes; each call gets ``deadline`` seconds once a worker has it.

    ``start_timeout`` bounds the start of a worker (interpreter plus ``warmup`` import, about a
    second) and is kept apart from the per-call deadline, so that a slow first import does not fail
    real calls; a killed worker is replaced at once while the other workers go on serving calls.
    One ``map`` runs at a time; concurrent callers queue on a lock.
    """

    def __init__(self, size: int, warmup: str = "", start_timeout: float = 60.0) -> None:
        if size < 1:
            raise ValueError(f"pool size must be positive, got {size}")
        self.size = size
        self.warmup = warmup
        self.start_timeout = start_timeout
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], deadline: float) -> list[Any]:
        """``[fn(*args) for args in calls]``, with ``None`` for calls that failed or ran past the deadline."""
        results: list[Any] = [None] * len(calls)
        if not calls:
            return results
        with self._lock:
            for worker in [w for w in self._workers if w.task is not None]:
                self._replace(worker)  # busy with a call of a map that was interrupted
            pending = deque(range(len(calls)))
            while len(self._workers) < self.size:  # all of them, so a kill leaves spares ready
                self._workers.append(_Worker(self.warmup))
            while pending or any(worker.task is not None for worker in self._workers):
                for worker in self._workers:
                    if worker.ready and worker.task is None and pending:
                        index = pending.popleft()
                        try:
                            payload = pickle.dumps((fn, calls[index]))
                        except Exception as error:  # noqa: BLE001 - pickling raises many types
                            log.warning("call %d cannot be sent to a worker: %s", index, error)
                            continue
                        try:
                            worker.conn.send_bytes(payload)
                        except OSError as error:
                            log.warning("a worker refused call %d: %s", index, error)
                            self._replace(worker)
                            continue
                        worker.task, worker.deadline = index, time.monotonic() + deadline
                self._step(results, pending)
        return results

    def _step(self, results: list[Any], pending: deque[int]) -> None:
        """Wait for the next event (a reply, a ready worker, a deadline) and handle what happened.

        A worker that dies or hangs before it is ready would fail the same way again, so the calls
        still pending are given up (left ``None``) instead of retried forever.
        """
        limits = [
            w.deadline if w.ready else w.started + self.start_timeout
            for w in self._workers
            if w.task is not None or not w.ready
        ]
        timeout = max(0.0, min(limits, default=time.monotonic()) - time.monotonic())
        for ready in wait([w.conn for w in self._workers], timeout=timeout):
            worker = next(w for w in self._workers if w.conn is ready)
            try:
                status, value = worker.conn.recv()
            except (EOFError, OSError):
                if not worker.ready:
                    self._give_up(pending, "a worker exited before it was ready")
                elif worker.task is not None:
                    log.warning("a worker died during call %d", worker.task)
                self._replace(worker)
                continue
            if status == "ready":
                worker.ready = True
                continue
            if status == "error":
                log.warning("call %d failed in its worker: %s", worker.task, value)
            results[worker.task] = value if status == "ok" else None
            worker.task = None
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.ready and worker.task is not None and now >= worker.deadline:
                log.warning("call %d ran past its deadline; killing its worker", worker.task)
                self._replace(worker)
            elif not worker.ready and now >= worker.started + self.start_timeout:
                self._give_up(pending, f"a worker did not start within {self.start_timeout:.0f} s")
                self._replace(worker)

    @staticmethod
    def _give_up(pending: deque[int], reason: str) -> None:
        log.error("%s; %d pending calls score None", reason, len(pending))
        pending.clear()

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` (its call keeps its ``None`` result) and start a fresh one in its place."""
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self.warmup)

    def close(self) -> None:
        """Stop every worker; the pool starts new ones if it is used again."""
        with self._lock:
            self._stop_workers()

    def _stop_workers(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers.clear()


_pools: dict[tuple[int, str], DeadlinePool] = {}
_pools_lock = threading.Lock()


def shared_pool(size: int, warmup: str) -> DeadlinePool:
    """One process-wide pool per (size, warmup), created on first use and stopped at exit."""
    with _pools_lock:
        key = (size, warmup)
        if key not in _pools:
            _pools[key] = DeadlinePool(size, warmup)
        return _pools[key]


@atexit.register
def _close_pools() -> None:
    """Stop the workers at exit without waiting for a map that another thread may be stuck in."""
    for pool in _pools.values():
        pool._stop_workers()
