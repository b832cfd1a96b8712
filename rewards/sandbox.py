"""Run untrusted code against unit tests in a bubblewrap sandbox.

Isolation comes from the operating system, not from Python-level guards (which generated code can
undo): ``bwrap`` gives the program fresh user, pid, network, ipc, uts and cgroup namespaces, uid
65534 with no capabilities, an empty environment, a read-only view of the system and the
interpreter only, and a small private tmpfs as its only writable place. Inside, the harness
(``rewards/sandbox_harness.py``) runs as the namespace's pid 1 (which the kernel shields from signals
sent by the solution) and non-dumpable (so ``/proc`` does not expose its memory or pipes), sets
resource limits before any untrusted code exists, and runs each test in a fresh child interpreter.
While a test runs it watches the sandbox's task count and resident memory (RLIMIT_NPROC does not
bind a sandbox started by root, whose uid 65534 maps back to root), and after each test it kills
every other process in the sandbox; it reports the verdicts behind a random nonce. Out here a
wall-clock deadline kills the sandbox's process group (``--die-with-parent`` then takes down
everything inside), and output is read up to a cap.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HARNESS = Path(__file__).with_name("sandbox_harness.py")
CHILD = HARNESS.with_name("sandbox_child.py")  # run by the harness, from the same directory
_SANDBOX_DIR = "/sandbox"
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64")
# Isolated, no bytecode written, and no site module: the harness needs the standard library only, and
# the base interpreter's .pth files, which site runs at start-up, may import packages (tens of ms).
_FLAGS = ("-I", "-B", "-S")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one program run; the defaults suit short competitive-programming style tests."""

    test_timeout: float = 3.0  # wall seconds per test (executing the solution plus the test)
    wall_timeout: float = 30.0  # wall seconds for the whole run; past it the run scores None
    memory_bytes: int = 1 << 30  # address space per process, and resident memory of the whole sandbox
    open_files: int = 64
    file_size_bytes: int = 16 << 20
    processes: int = 64  # processes/threads the run may add (RLIMIT_NPROC, and the harness's watch for root)
    tmp_bytes: int = 64 << 20  # size of the private /tmp
    output_bytes: int = 1 << 20  # how much of the harness's output is read


def python_executable() -> str:
    """The real interpreter behind ``sys.executable`` (a venv's python is a symlink into its base)."""
    return os.path.realpath(sys.executable)


def bwrap_command(bwrap: str, limits: SandboxLimits) -> list[str]:
    """The bwrap invocation that runs the harness; see the module docstring for what each part does."""
    command = [
        bwrap,
        "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--cap-drop", "ALL",
        "--as-pid-1", "--die-with-parent", "--new-session", "--clearenv",
    ]
    for directory in _SYSTEM_DIRS:
        if os.path.islink(directory):
            command += ["--symlink", os.readlink(directory), directory]
        elif os.path.isdir(directory):
            command += ["--ro-bind", directory, directory]
    python = python_executable()
    bound = list(_SYSTEM_DIRS)
    for directory in sorted({os.path.realpath(sys.base_prefix), os.path.dirname(python)}):
        if not any(directory == d or directory.startswith(d + "/") for d in bound):
            command += ["--ro-bind", directory, directory]
            bound.append(directory)
    command += [
        "--ro-bind", str(HARNESS), f"{_SANDBOX_DIR}/{HARNESS.name}",
        "--ro-bind", str(CHILD), f"{_SANDBOX_DIR}/{CHILD.name}",
        "--proc", "/proc", "--dev", "/dev",
        "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp",
        "--remount-ro", "/",
        "--chdir", "/tmp",
        "--", python, *_FLAGS, f"{_SANDBOX_DIR}/{HARNESS.name}",
    ]
    return command


@functools.cache
def sandbox_problem(bwrap: str = "bwrap") -> str | None:
    """Why the sandbox cannot run here (missing bwrap, no user namespaces, ...), or None if it can.

    Probed once per bwrap path by running the harness's interpreter in the real sandbox.
    """
    probe = bwrap_command(bwrap, SandboxLimits())[:-1] + ["-c", "pass"]
    try:
        result = subprocess.run(probe, capture_output=True, timeout=30, env={})
    except FileNotFoundError:
        return f"{bwrap!r} was not found (install bubblewrap)"
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{bwrap!r} could not start: {error}"
    if result.returncode != 0:
        return f"{bwrap!r} failed: {result.stderr.decode(errors='replace').strip()[:500]}"
    return None


def tasks_of_user() -> int:
    """Threads the calling user runs right now (0 for root, whom RLIMIT_NPROC does not bind).

    Kernels before 5.14 count every task of the user against RLIMIT_NPROC, the trainer's threads
    included, so the sandbox's process limit is set as headroom on top of this count.
    """
    uid = os.getuid()
    if uid == 0:
        return 0
    count = 0
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                status = Path(entry.path, "status").read_text()
                count += int(status.split("\nThreads:", 1)[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return count


def run_tests(solution: str, tests: list[str], limits: SandboxLimits, *, bwrap: str = "bwrap",
              sandboxed: bool = True) -> list[bool] | None:
    """Pass/fail per test, or None when the run produced no verdict (deadline, sandbox failure).

    ``sandboxed=False`` runs the same harness as a plain subprocess with an empty environment and
    the resource limits but without namespaces: for machines without bwrap, by explicit choice only.
    """
    nonce = secrets.token_hex(16)
    job = {
        "nonce": nonce, "solution": solution, "tests": tests, "test_timeout": limits.test_timeout,
        "limits": {
            "memory_bytes": limits.memory_bytes, "open_files": limits.open_files,
            "file_size_bytes": limits.file_size_bytes, "processes": limits.processes + tasks_of_user(),
            "cpu_seconds": math.ceil(limits.wall_timeout) + 1,
        },
        # Counted inside the sandbox's own pid namespace, so without the headroom above.
        "watch": {"tasks": limits.processes, "resident_bytes": limits.memory_bytes} if sandboxed else None,
    }
    payload = json.dumps(job).encode()
    if sandboxed:
        output = _run_capped(bwrap_command(bwrap, limits), payload, limits, cwd=None)
    else:
        with tempfile.TemporaryDirectory(prefix="reward-run-") as workdir:
            output = _run_capped([python_executable(), *_FLAGS, str(HARNESS)], payload, limits, workdir)
    if output is None:
        return None
    for line in output.decode("utf-8", "replace").splitlines():
        if line.startswith(nonce + " "):
            try:
                verdict = json.loads(line[len(nonce) + 1:])
            except ValueError:
                return None
            if isinstance(verdict, list) and len(verdict) == len(tests):
                return [item is True for item in verdict]
    return None


def _run_capped(command: list[str], stdin: bytes, limits: SandboxLimits, cwd: str | None) -> bytes | None:
    """Run ``command`` in its own process group feeding ``stdin``; its stdout, or None past the deadline.

    Stdin, stdout and stderr are served from one selector loop so that neither a full pipe nor a
    silent program can block past the deadline; stdout is kept up to ``output_bytes``, stderr is
    drained and dropped.
    """
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={}, cwd=cwd, start_new_session=True)
    deadline = time.monotonic() + limits.wall_timeout
    os.set_blocking(process.stdin.fileno(), False)
    kept = bytearray()
    pending = memoryview(stdin)
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdin, selectors.EVENT_WRITE)
        selector.register(process.stdout, selectors.EVENT_READ)
        selector.register(process.stderr, selectors.EVENT_READ)
        try:
            while len(selector.get_map()) and (left := deadline - time.monotonic()) > 0:
                for key, _ in selector.select(timeout=left):
                    if key.fileobj is process.stdin:
                        try:
                            pending = pending[os.write(key.fd, pending[:65536]):]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            selector.unregister(process.stdin)
                            process.stdin.close()
                        continue
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fileobj)
                    elif key.fileobj is process.stdout:
                        kept += chunk[: max(0, limits.output_bytes - len(kept))]
            finished = not selector.get_map()
            if finished:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            finished = False
        finally:
            _kill_group(process)
            for stream in (process.stdin, process.stdout, process.stderr):
                stream.close()
    return bytes(kept) if finished and process.returncode == 0 else None


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of a still-running run; bwrap's --die-with-parent then takes the
    whole sandbox down. An already reaped process is left alone, as its id may have been reused."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait()
