"""Crash-safe checkpoint publishing on real files: staging, rename, LATEST, pruning, a full disk."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stages.checkpoints import (LATEST, STAGING, checkpoint_problem, discard_staging, is_disk_full,
                                last_complete_checkpoint, publish, published)


def stage_checkpoint(directory: Path, step: int) -> Path:
    """A checkpoint as the trainer stages it: a small safetensors file, then trainer_state.json."""
    staged = directory / STAGING / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    save_file({"w": torch.full((4,), float(step))}, staged / "model.safetensors")
    (staged / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return staged


def test_publish_renames_into_place_points_latest_at_it_and_prunes_only_older_ones(tmp_path):
    for step in (10, 20, 30):
        target = publish(stage_checkpoint(tmp_path, step), tmp_path, keep=2)
        assert target == tmp_path / f"checkpoint-{step}" and checkpoint_problem(target) is None
        assert (tmp_path / LATEST).read_text() == f"checkpoint-{step}\n"
        assert not list((tmp_path / STAGING).iterdir())
    assert [p.name for p in published(tmp_path)] == ["checkpoint-30", "checkpoint-20"]
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-30"


def test_the_same_step_published_twice_keeps_the_newer(tmp_path):
    publish(stage_checkpoint(tmp_path, 10), tmp_path, keep=None)
    staged = stage_checkpoint(tmp_path, 10)
    (staged / "marker").write_text("newer")
    publish(staged, tmp_path, keep=None)
    assert (tmp_path / "checkpoint-10" / "marker").read_text() == "newer"


def test_an_unfinished_save_never_becomes_a_checkpoint_and_is_discarded(tmp_path, caplog):
    publish(stage_checkpoint(tmp_path, 10), tmp_path, keep=1)
    staged = stage_checkpoint(tmp_path, 20)
    (staged / "trainer_state.json").unlink()  # killed before the trainer state was written
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    (tmp_path / STAGING / "README.md").write_text("model card")
    discard_staging(tmp_path)
    assert [p.name for p in (tmp_path / STAGING).iterdir()] == ["README.md"] and "checkpoint-20" in caplog.text
    assert [p.name for p in published(tmp_path)] == ["checkpoint-10"]


def test_disk_full_is_recognised_through_wrapped_errors(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    try:
        try:
            raise OSError(errno.EDQUOT, "quota")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from inner
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped, tmp_path)
    assert is_disk_full(RuntimeError("Error while serializing: No space left on device (os error 28)"), tmp_path)
    assert not is_disk_full(ValueError("a bug"), tmp_path)  # this disk has room


def test_pruning_never_removes_the_only_complete_checkpoint(tmp_path):
    publish(stage_checkpoint(tmp_path, 10), tmp_path, keep=1)
    with pytest.raises(FileNotFoundError):
        publish(tmp_path / STAGING / "checkpoint-20", tmp_path, keep=1)  # nothing was staged
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
