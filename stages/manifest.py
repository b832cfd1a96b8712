"""The run manifest, ``<run_dir>/manifest.json``: what a run was made of, to reproduce or audit it.

It records the resolved config (after profile overrides) and its hash, the project's git commit, a
fingerprint of every stage's data blend, the versions of the packages that decide the numbers, and
per stage: config hash, start and end time, attempts (1 + resumes), steps, final metrics and the
final checkpoint. Every stage process updates it on the main process when it starts and finishes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from data_blends.blend import BlendSpec
from stages.checkpoints import write_durably
from stages.config import PipelineConfig

PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "safetensors",
            "deepspeed", "triton", "math-verify")
PROJECT = Path(__file__).resolve().parent.parent
_LARGE_FILE = 256 * 2**20  # hash files up to this size; bigger ones are fingerprinted by size and mtime


def manifest_path(config: PipelineConfig) -> Path:
    return Path(config.run_dir) / "manifest.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def git_commit() -> dict[str, Any] | None:
    """The project's commit and whether the working tree had uncommitted changes; None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT, capture_output=True, text=True, check=True).stdout
    try:
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain").strip())}
    except (OSError, subprocess.CalledProcessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _file_digest(path: Path) -> str:
    if path.stat().st_size > _LARGE_FILE:
        stat = path.stat()
        return f"size={stat.st_size},mtime={int(stat.st_mtime)}"
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def blend_fingerprint(blend_file: Path, spec: BlendSpec) -> dict[str, Any]:
    """What a blend's rows come from: the spec file, each local file's content, the generators' code,
    and hub dataset names (a hub dataset is not pinned to a revision, so it is named, not hashed)."""
    from data_blends import generators

    sources = {}
    for source in spec.sources:
        if source.kind == "generator":
            sources[source.name] = "generator " + _file_digest(Path(generators.__file__))
        elif source.kind == "hub":
            sources[source.name] = f"hub {source.path} subset={source.subset} split={source.split}"
        else:
            sources[source.name] = f"{source.kind} {source.path} {_file_digest(blend_file.parent / source.path)}"
    return {"file": str(blend_file), "digest": _file_digest(blend_file), "sources": sources}


def _run_fields(config: PipelineConfig) -> dict[str, Any]:
    resolved = dataclasses.asdict(config)
    for stage in resolved["stages"]:
        stage.pop("blend_spec")  # the parsed blend file; its fingerprint is under "blends"
    text = json.dumps(resolved, sort_keys=True, default=str)
    return {
        "profile": config.profile,
        "config": resolved,
        "config_hash": hashlib.sha256(text.encode()).hexdigest()[:16],
        "git": git_commit(),
        "packages": package_versions(),
        "blends": {s.name: blend_fingerprint(Path(s.blend), s.blend_spec) for s in config.stages},
    }


def read_manifest(config: PipelineConfig) -> dict[str, Any]:
    path = manifest_path(config)
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def _update(config: PipelineConfig, stage: str, fields: dict[str, Any]) -> None:
    manifest = read_manifest(config) | _run_fields(config)
    manifest["stages"][stage] = manifest["stages"].get(stage, {}) | fields
    manifest["updated_at"] = _now()
    path = manifest_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, json.dumps(manifest, indent=2, default=str))


def stage_started(config: PipelineConfig, stage: str, resumed_from: str | None) -> None:
    entry = read_manifest(config)["stages"].get(stage, {})
    fresh = entry.get("config_hash") != config.stage_hash(stage) or entry.get("status") == "done"
    attempts = 1 if fresh else entry.get("attempts", 0) + 1
    fields = {"config_hash": config.stage_hash(stage), "status": "running", "attempts": attempts,
              "resumed_from": resumed_from}
    if fresh:
        fields |= {"started_at": _now(), "ended_at": None}
    _update(config, stage, fields)


def stage_finished(config: PipelineConfig, stage: str, summary: dict[str, Any]) -> None:
    _update(config, stage, {"status": "done", "ended_at": _now(), "steps": summary["steps"],
                            "train_metrics": summary["train_metrics"], "eval": summary["eval"],
                            "checkpoint": summary["final"]})
