"""Crash-safe trainer checkpoints: staged, flushed, renamed into place, pruned only after a newer one.

The trainer writes every checkpoint into ``checkpoints/.staging/checkpoint-N`` (its ``output_dir``).
Once every process has finished writing, the main process flushes the files to disk, renames the
directory to ``checkpoints/checkpoint-N`` (atomic on one filesystem), then points ``LATEST`` at it,
and only then deletes the oldest checkpoints beyond ``save_total_limit``. A crash, a ``kill -9`` or a
full disk at any moment leaves every published checkpoint whole: what was being written stays in
``.staging`` and is discarded at the next start.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import TrainerCallback

log = logging.getLogger("stages")

STAGING = ".staging"
LATEST = "LATEST"
_NEARLY_FULL = 16 * 2**20  # bytes free below which a failed write is taken for a full disk


class DiskFull(RuntimeError):
    """Saving a checkpoint ran out of disk space; the published checkpoints are intact."""


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name.rsplit("-", 1)[-1]
    return int(suffix) if path.name.startswith("checkpoint-") and suffix.isdigit() else None


def checkpoint_problem(path: Path) -> str | None:
    """Why a trainer checkpoint is unusable (missing or truncated files), or None if it is complete.

    Staging makes a partial checkpoint unlikely in ``checkpoints/``, but a checkpoint copied by hand,
    or one on a filesystem that lost data in a power cut, is checked before it is trusted.
    """
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return "trainer_state.json is missing or truncated"
    if f"checkpoint-{state.get('global_step')}" != path.name:
        return f"trainer_state.json belongs to step {state.get('global_step')}"
    weights = list(path.glob("*.safetensors"))
    if not weights:
        return "no model weights"
    for file in weights:
        with file.open("rb") as handle:
            header = handle.read(8)
            size = int.from_bytes(header, "little") if len(header) == 8 else -1
            try:
                meta = json.loads(handle.read(size)) if size > 0 else None
            except ValueError:
                meta = None
        end = max((t["data_offsets"][1] for k, t in (meta or {}).items() if k != "__metadata__"), default=0)
        if meta is None or file.stat().st_size != 8 + size + end:
            return f"{file.name} is truncated"
    return None


def published(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, newest first."""
    if not directory.exists():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def last_complete_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint; broken newer ones are reported and passed over."""
    for path in published(directory):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is incomplete (%s); using an earlier one", path, problem)
    return None


def discard_staging(directory: Path) -> None:
    """Remove what an interrupted save left in ``.staging``: it never became a checkpoint. (Other files
    there, such as the model card TRL writes into its output directory, stay.)"""
    leftovers = published(directory / STAGING)
    if leftovers:
        log.warning("discarding %s, left by a save that did not finish: %s", directory / STAGING,
                    ", ".join(p.name for p in leftovers))
    for path in leftovers:
        shutil.rmtree(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """Replace a small file atomically: write a temporary file, flush it, rename it over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def publish(staged: Path, directory: Path, keep: int | None) -> Path:
    """Flush ``staged`` to disk, rename it into ``directory``, point LATEST at it, then prune."""
    for file in staged.rglob("*"):
        if file.is_file():
            _fsync(file)
    _fsync(staged)
    target = directory / staged.name
    if target.exists():  # the same step saved again (a SIGTERM save on a save step): keep the newer
        shutil.rmtree(target)
    os.replace(staged, target)
    _fsync(directory)
    write_durably(directory / LATEST, target.name + "\n")
    if keep and keep > 0:
        for old in published(directory)[keep:]:
            shutil.rmtree(old)
    return target


def is_disk_full(error: BaseException | None, directory: Path) -> bool:
    """True if ``error`` (or what caused it) is the disk under ``directory`` running out of space.

    safetensors wraps the OS error in its own exception type and ``torch.save`` drops it altogether
    ("file write failed"), so the message is checked as well as ``errno``, and then the disk itself.
    """
    while error is not None:
        if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return shutil.disk_usage(directory).free < _NEARLY_FULL


class PublishCheckpoints(TrainerCallback):
    """Publish each checkpoint the trainer staged, after every process finished writing its part."""

    def __init__(self, directory: Path, keep: int | None):
        self.directory = directory
        self.keep = keep

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        process = PartialState()
        process.wait_for_everyone()  # other ranks' RNG states and shards land in the same directory
        if state.is_world_process_zero:
            staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            log.info("checkpoint %s", publish(staged, self.directory, self.keep))
        process.wait_for_everyone()
