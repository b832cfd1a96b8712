"""The run report: one Markdown page with the eval table after every stage, and PNG plots.

Built only from what the stages wrote (``eval.json``, ``metrics.jsonl``, ``DONE.json``, the manifest), so it can be
made at any time, for a finished or an interrupted run: ``make report``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from stages.config import PipelineConfig
from stages.manifest import read_manifest

ROWS = [  # (label, eval summary key)
    ("math accuracy /think", "math/think/accuracy"), ("math accuracy /no_think", "math/no_think/accuracy"),
    ("math, multi-step /think", "math/think/accuracy_multi_step"),
    ("math, multi-step /no_think", "math/no_think/accuracy_multi_step"),
    ("math, one-step /think", "math/think/accuracy_one_step"),
    ("math, one-step /no_think", "math/no_think/accuracy_one_step"),
    ("science accuracy /think", "science/think/accuracy"), ("science accuracy /no_think", "science/no_think/accuracy"),
    ("code accuracy /think", "code/think/accuracy"), ("code accuracy /no_think", "code/no_think/accuracy"),
    ("instruction following /think", "ifeval/think/pass_rate"),
    ("instruction following /no_think", "ifeval/no_think/pass_rate"),
    ("safety refusal /think", "safety/think/refusal_rate"), ("safety refusal /no_think", "safety/no_think/refusal_rate"),
    ("over-refusal /think", "safety/think/over_refusal_rate"),
    ("over-refusal /no_think", "safety/no_think/over_refusal_rate"),
    ("mean verifiable reward /think", "reward/think"), ("mean verifiable reward /no_think", "reward/no_think"),
    ("mean sampled reward /think", "sampled_reward/think"),
    ("mean sampled reward /no_think", "sampled_reward/no_think"),
]
LENGTH_MODES = ("think", "no_think")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def stage_metrics(stage_dir: Path) -> list[dict[str, Any]]:
    """Every logged training step of a stage, its rounds' in order (with a running step count)."""
    parts = sorted(stage_dir.glob("round_*"), key=lambda p: int(p.name.split("_")[1])) or [stage_dir]
    entries, offset = [], 0
    for part in parts:
        logged = read_jsonl(part / "metrics.jsonl")
        entries += [e | {"step": e["step"] + offset} for e in logged if "loss" in e]
        offset = entries[-1]["step"] if entries else offset
    return entries


def mean_length(summary: dict[str, float], mode: str) -> float | None:
    values = [v for k, v in summary.items() if k.endswith(f"/{mode}/mean_length")]
    return sum(values) / len(values) if values else None


def eval_table(evals: dict[str, dict[str, float]]) -> list[str]:
    stages = list(evals)
    lines = ["| held-out metric | " + " | ".join(f"`{s}`" for s in stages) + " |", "|---" * (len(stages) + 1) + "|"]
    cell = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for label, key in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(evals[s].get(key)) for s in stages) + " |")
    for mode in LENGTH_MODES:
        lines.append(f"| mean response length /{mode} (tokens) | "
                     + " | ".join(cell(mean_length(evals[s], mode)) for s in stages) + " |")
    return lines


def plot(run_dir: Path, metrics: dict[str, list[dict]], evals: dict[str, dict[str, float]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4 * max(len(metrics), 1), 3), squeeze=False)
    for axis, (stage, entries) in zip(axes[0], metrics.items()):
        axis.plot([e["step"] for e in entries], [e["loss"] for e in entries])
        axis.set_title(stage)
        axis.set_xlabel("step")
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=110)
    written.append("loss.png")
    grpo = next((entries for stage, entries in metrics.items() if any("reward" in e for e in entries)), None)
    if grpo:
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
        steps = [e["step"] for e in grpo]
        left.plot(steps, [e.get("reward") for e in grpo])
        left.set_title("GRPO mean reward")
        for mode in LENGTH_MODES:
            right.plot(steps, [e.get(f"completions/{mode}/mean_length") for e in grpo], label=f"/{mode}")
        right.set_title("GRPO completion length")
        right.legend()
        for axis in (left, right):
            axis.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(run_dir / "grpo.png", dpi=110)
        written.append("grpo.png")
    fig, axis = plt.subplots(figsize=(8, 4))
    stages = list(evals)
    for label, key in ROWS:
        values = [evals[s].get(key) for s in stages]
        if any(v is not None for v in values):
            axis.plot(stages, values, marker="o", label=label)
    axis.set_ylabel("held-out rate")
    axis.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(run_dir / "eval.png", dpi=110)
    written.append("eval.png")
    plt.close("all")
    return written


def stage_state(stage_dir: Path, record: dict[str, Any] | None) -> str:
    """'finished, 1500 steps in 12.3 min (2 attempts)' or 'not finished'."""
    done = stage_dir / "DONE.json"
    if not done.exists():
        return "not finished"
    state = f"finished, {json.loads(done.read_text())['steps']} steps"
    if record and record.get("started_at") and record.get("ended_at"):
        start, end = (datetime.strptime(record[k], "%Y-%m-%dT%H:%M:%S%z") for k in ("started_at", "ended_at"))
        attempts = record.get("attempts", 1)
        state += f" in {(end - start).total_seconds() / 60:.1f} min" + (f" ({attempts} attempts)" if attempts > 1 else "")
    return state


def write_report(config: PipelineConfig) -> Path:
    """Write ``<run_dir>/report.md`` and its plots; returns the report's path."""
    run_dir = Path(config.run_dir)
    manifest = read_manifest(config)
    evals, metrics, lines = {}, {}, [f"# Run report: profile `{config.profile}`", ""]
    if git := manifest.get("git"):
        lines += [f"Commit `{git['commit'][:12]}`{' with uncommitted changes' if git['dirty'] else ''}, "
                  f"config hash `{manifest['config_hash']}`; everything else in `manifest.json`.", ""]
    for stage in config.stages:
        stage_dir = run_dir / stage.name
        report = stage_dir / "eval.json"
        if report.exists():
            evals[stage.name] = json.loads(report.read_text())["summary"]
        if entries := stage_metrics(stage_dir):
            metrics[stage.name] = entries
        lines.append(f"- `{stage.name}` ({stage.kind}): {stage_state(stage_dir, manifest['stages'].get(stage.name))}")
    lines += ["", "## Held-out evaluation after each stage", ""]
    lines += eval_table(evals) if evals else ["(no stage has been evaluated yet)"]
    if evals or metrics:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plot(run_dir, metrics, evals)]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
