"""Blend specs: which sources make up a stage's data, in what proportion, and how often with /think.

A blend file is YAML::

    num_examples: 20000     # rows drawn in total, split across sources by weight
    seed: 0
    sources:
      - {name: math, kind: generator, weight: 3, reasoning_on: 0.5}
      - {name: chat, kind: jsonl, path: data/chat.jsonl, weight: 1, reasoning_on: 0.0}

``reasoning_on`` is the share of a source's rows rendered with ``/think``; a row without a reasoning
trace is always rendered with ``/no_think`` in SFT. RL stages name each source's rewards and weights,
e.g. ``rewards: {math: 1.0, format: 0.2}``, and use ``reasoning_on`` for the prompts' mode alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from data_blends import generators
from data_blends.loaders import read_hub, read_jsonl, read_parquet
from data_blends.task import TaskRow
from rewards import REWARDS
from stages.schema import ConfigError, from_dict


@dataclass
class SourceSpec:
    name: str  # label in logs; for a generator, which generator
    kind: Literal["generator", "jsonl", "parquet", "hub"]
    weight: float = 1.0
    reasoning_on: float = 0.5
    path: str | None = None  # a jsonl/parquet file (relative to the blend file) or a hub dataset name
    split: str = "train"
    subset: str | None = None  # hub dataset configuration
    max_rows: int | None = None  # read at most this many rows of a file or hub dataset
    rewards: dict[str, float] | None = None  # RL stages: reward name (rewards.REWARDS) -> weight


@dataclass
class BlendSpec:
    sources: list[SourceSpec]
    num_examples: int
    seed: int = 0


@dataclass
class Example:
    """One training conversation: a row and the reasoning mode it is rendered in."""
    row: TaskRow
    think: bool


def load_blend(path: str | Path, check_files: bool = True) -> BlendSpec:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: blend file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    spec = from_dict(BlendSpec, data, str(path))
    for i, source in enumerate(spec.sources):
        where = f"{path}: sources[{i}]"
        if source.weight <= 0:
            raise ConfigError(f"{where}.weight: must be positive, got {source.weight}")
        if not 0.0 <= source.reasoning_on <= 1.0:
            raise ConfigError(f"{where}.reasoning_on: must be within [0, 1], got {source.reasoning_on}")
        if source.kind == "generator" and source.name not in generators.SOURCES_GENERATED:
            raise ConfigError(f"{where}.name: unknown generator {source.name!r}; "
                              f"generators: {list(generators.SOURCES_GENERATED)}")
        for reward in source.rewards or {}:
            if reward not in REWARDS:
                raise ConfigError(f"{where}.rewards.{reward}: unknown reward; rewards: {sorted(REWARDS)}")
        if source.kind != "generator" and not source.path:
            raise ConfigError(f"{where}.path: required for kind {source.kind!r}")
        if source.kind in ("jsonl", "parquet"):
            source.path = str((path.parent / source.path).resolve())
            if check_files and not Path(source.path).exists():
                raise ConfigError(f"{where}.path: data file not found: {source.path}")
    return spec


def _source_rows(source: SourceSpec, count: int, seed: int) -> list[TaskRow]:
    """``count`` rows of one source: generated fresh, or drawn from the file (repeating only if it is short)."""
    if source.kind == "generator":
        return generators.generate(source.name, source.split, count, seed=seed)
    if source.kind == "jsonl":
        rows = list(read_jsonl(source.path, source.name))
    elif source.kind == "parquet":
        rows = list(read_parquet(source.path, source.name))
    else:
        rows = list(read_hub(source.path, source.name, source.split, source.subset, source.max_rows or count))
    rows = rows[: source.max_rows] if source.max_rows else rows
    if not rows:
        raise ConfigError(f"source {source.name!r}: no rows in {source.path}")
    rng = random.Random(f"{seed}-{source.name}")
    rng.shuffle(rows)
    return [rows[i % len(rows)] for i in range(count)]


def build_examples(spec: BlendSpec, need_trace: bool = True) -> list[Example]:
    """Draw the blend's rows, assign each its reasoning mode, and shuffle sources together.

    ``need_trace``: a row can only be rendered with /think if it has a reasoning trace (SFT); prompts
    for RL need none.
    """
    total_weight = sum(s.weight for s in spec.sources)
    examples: list[Example] = []
    for source in spec.sources:
        count = round(spec.num_examples * source.weight / total_weight)
        rng = random.Random(f"{spec.seed}-mode-{source.name}")
        for row in _source_rows(source, count, spec.seed):
            think = (bool(row["thinking"]) or not need_trace) and rng.random() < source.reasoning_on
            examples.append(Example(row=row, think=think))
    random.Random(spec.seed).shuffle(examples)
    return examples
