"""The shared stage runner: where a stage starts from, resume, the final checkpoint, the hand-off.

Layout of a run directory::

    <run_dir>/base/                      the starting model of the first stage (layouts: built here)
    <run_dir>/<stage>/checkpoints/       trainer checkpoints (model, optimizer, scheduler, RNG, step),
                                         written crash-safe (stages/checkpoints.py); LATEST names the newest
    <run_dir>/<stage>/final/             HF checkpoint (model, tokenizer, config): the next stage's start
    <run_dir>/<stage>/STARTED.json       the config hash the stage was started with (resume checks it)
    <run_dir>/<stage>/DONE.json          written last: the stage is finished (config hash, metrics)
    <run_dir>/<stage>/metrics.jsonl      every logged training step
    <run_dir>/<stage>/eval.json          held-out evaluation of the final model
    <run_dir>/manifest.json              resolved config, commit, blends, versions, per-stage record

A stage's module provides ``build_trainer(ctx, model, tokenizer)``; everything else is here, so no
stage copies another's loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import PartialState
from transformers import Trainer, TrainerCallback

from model.factory import build_model, is_layout_name, load_model, load_tokenizer
from model.tokenizer import train_tokenizer
from stages.checkpoints import (STAGING, DiskFull, PublishCheckpoints, discard_staging, is_disk_full,
                                last_complete_checkpoint, write_durably)
from stages.config import PipelineConfig, StageSpec
from stages.manifest import stage_finished, stage_started
from stages.schema import ConfigError

log = logging.getLogger("stages")

SUPERSEDED = "superseded"  # where RERUN_FROM moves the stages it retrains
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StageContext:
    config: PipelineConfig
    stage: StageSpec
    part: str = ""  # a part of a stage trained on its own (an RPO round), in a subdirectory

    @property
    def dir(self) -> Path:
        return Path(self.config.run_dir) / self.stage.name / self.part

    @property
    def label(self) -> str:
        return f"{self.stage.name}/{self.part}" if self.part else self.stage.name

    def round(self, index: int) -> StageContext:
        return StageContext(self.config, self.stage, f"round_{index}")

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def final(self) -> Path:
        return self.dir / "final"

    @property
    def done_marker(self) -> Path:
        return self.dir / "DONE.json"

    @property
    def started_marker(self) -> Path:
        return self.dir / "STARTED.json"


class StageModule(Protocol):
    """A stage: ``build_trainer`` for one training run; a stage made of several runs (RPO's rounds)
    provides ``train(ctx, start) -> (steps, metrics)`` instead, built on ``train_phase``."""

    def build_trainer(self, ctx: StageContext, model: torch.nn.Module, tokenizer: Any) -> Trainer: ...


class MetricsLog(TrainerCallback):
    """Append each log (loss, learning rate, tokens/s) to metrics.jsonl, which outlives the process."""

    def __init__(self, path: Path):
        self.path = path
        self._last: tuple[float, int] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.time(), int(state.num_input_tokens_seen or 0)
        if self._last is not None and now > self._last[0] and tokens > self._last[1]:
            logs["tokens_per_second"] = round((tokens - self._last[1]) / (now - self._last[0]), 1)
        self._last = (now, tokens)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class Preemption(TrainerCallback):
    """SIGTERM (a scheduler's preemption): save a checkpoint at the end of the current step and stop."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = control.should_training_stop = True


def base_model_dir(config: PipelineConfig) -> Path:
    """The first stage's starting point: a pretrained path as is, or a layout built once in the run dir."""
    if not is_layout_name(config.model.name):
        return Path(config.model.name)
    base = Path(config.run_dir) / "base"
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process and not (base / "config.json").exists():
            _build_base(config, base)
    return base


def _build_base(config: PipelineConfig, base: Path) -> None:
    """Train the embedded tokenizer on a sample of every stage's blend; save it with a randomly initialised model."""
    from data_blends.blend import build_examples
    from data_blends.chat import conversation

    if config.model.tokenizer:
        tokenizer = load_tokenizer(config.model.tokenizer)
    else:
        corpus = []
        for stage in (s for s in config.stages if s.kind == "sft"):  # a sample of each SFT blend is plenty
            sample = dataclasses.replace(stage.blend_spec, num_examples=min(stage.blend_spec.num_examples, 4000))
            for example in build_examples(sample):
                corpus.extend(f"{m['role']}\n{m['content']}" for m in conversation(example.row, example.think))
        tokenizer = train_tokenizer(corpus, vocab_size=config.model.tokenizer_vocab_size)
    model = build_model(config.model.name, tokenizer, seed=config.seed, dtype=DTYPES[config.model.dtype])
    tmp = base.with_name(base.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(base)
    log.info("built %s (%d parameters) in %s", config.model.name, model.num_parameters(), base)


def start_dir(config: PipelineConfig, stage: StageSpec) -> Path:
    """The previous stage's final checkpoint, or the base model for the first stage."""
    previous = config.previous(stage.name)
    if previous is None:
        return base_model_dir(config)
    ctx = StageContext(config, previous)
    if not ctx.done_marker.exists():
        raise ConfigError(f"stage {stage.name!r} starts from {previous.name!r}, which has not finished: "
                          f"run `make {previous.name.replace('_', '-')}` first")
    return ctx.final


def check_finished(ctx: StageContext) -> bool:
    """True if the stage finished with this config. A stage finished or started with another config is
    an error that says how to retrain from it; resuming it or skipping it would mix two configs."""
    current = ctx.config.stage_hash(ctx.stage.name)
    for marker, what in ((ctx.done_marker, "finished"), (ctx.started_marker, "was started")):
        if marker.exists() and (recorded := json.loads(marker.read_text())["config_hash"]) != current:
            raise ConfigError(
                f"stage {ctx.stage.name!r} {what} with a different config (hash {recorded}, now {current}): "
                f"its own settings or an earlier stage's changed. Its result and every later stage's are "
                f"stale. To retrain from it: make pipeline RERUN_FROM={ctx.stage.name} (moves "
                f"{ctx.dir} and the later stages' directories to {Path(ctx.config.run_dir) / SUPERSEDED}/)."
            )
    return ctx.done_marker.exists()


def supersede(config: PipelineConfig, first: str) -> Path | None:
    """Move stage ``first``'s directory and every later stage's aside, so they train again; nothing is
    deleted. Returns where they went (None if none of them had started)."""
    names = [s.name for s in config.stages]
    moved = [StageContext(config, s).dir for s in config.stages[names.index(config.stage(first).name):]]
    moved = [d for d in moved if d.exists()]
    if not moved:
        return None
    target = Path(config.run_dir) / SUPERSEDED / time.strftime("%Y%m%d-%H%M%S")
    target.mkdir(parents=True)
    for directory in moved:
        directory.rename(target / directory.name)
    return target


def trainer_arguments(ctx: StageContext) -> dict[str, Any]:
    """The TrainingArguments every stage shares, from ``trainer:`` (each stage adds its own)."""
    spec = ctx.stage.trainer
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.dir / "tensorboard")  # transformers' TensorBoard setting
    return dict(
        output_dir=str(ctx.checkpoints / STAGING),  # published into ctx.checkpoints by PublishCheckpoints
        max_steps=spec.max_steps,
        learning_rate=spec.learning_rate,
        per_device_train_batch_size=spec.per_device_train_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        lr_scheduler_type=spec.lr_scheduler_type,
        warmup_steps=spec.warmup_steps,
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        logging_steps=spec.logging_steps,
        save_steps=spec.save_steps,
        save_total_limit=None,  # pruning is PublishCheckpoints' job, after a newer checkpoint is complete
        bf16=spec.bf16,
        activation_checkpointing=spec.gradient_checkpointing,
        dataloader_num_workers=spec.dataloader_num_workers,
        seed=ctx.config.seed,
        data_seed=ctx.config.seed,
        report_to=["tensorboard"],
        save_only_model=False,
        use_cpu=not torch.cuda.is_available(),
    )


def train_phase(ctx: StageContext, start: Path, build_trainer: Any) -> tuple[int, dict]:
    """Train from ``start`` into ``ctx.final``, resuming from the last checkpoint; returns (steps, metrics)."""
    ctx.dir.mkdir(parents=True, exist_ok=True)
    if PartialState().is_main_process:
        discard_staging(ctx.checkpoints)
    PartialState().wait_for_everyone()
    resume = last_complete_checkpoint(ctx.checkpoints)
    if resume:
        log.info("resuming %s from %s", ctx.label, resume)
    tokenizer = load_tokenizer(start)
    # The weights of a resumed run are loaded here, with from_pretrained: NemotronH checkpoints store
    # legacy key names ("backbone.*") that the Trainer's own resume (a non-strict load_state_dict)
    # silently skips, which would restart training from the stage's initial weights.
    model = load_model(resume or start, dtype=DTYPES[ctx.config.model.dtype])
    trainer = build_trainer(ctx, model, tokenizer)
    trainer.add_callback(MetricsLog(ctx.dir / "metrics.jsonl"))
    trainer.add_callback(preemption := Preemption())
    trainer.add_callback(PublishCheckpoints(ctx.checkpoints, ctx.stage.trainer.save_total_limit))
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception as error:
        if not is_disk_full(error, ctx.dir):
            raise
        discard_staging(ctx.checkpoints)  # give back the space the unfinished save took
        raise DiskFull(f"{ctx.label}: no space left on device at step {trainer.state.global_step} "
                       f"(writing under {ctx.dir}). The last complete checkpoint, "
                       f"{last_complete_checkpoint(ctx.checkpoints) or 'none yet'}, is intact: free space "
                       f"and rerun the same target to resume from it. ({type(error).__name__}: "
                       f"{str(error)[:200]})") from error
    if preemption.requested:
        log.warning("%s stopped at step %d on SIGTERM; rerun the same target to continue", ctx.label,
                    trainer.state.global_step)
        raise SystemExit(0)
    save_final(trainer, ctx.final)
    return trainer.state.global_step, result.metrics


def save_final(trainer: Trainer, final: Path) -> None:
    """Weights, config and tokenizer (the trainer's processing_class), written beside ``final`` and
    renamed into place, so the next stage never starts from half a checkpoint."""
    tmp = final.with_name(final.name + ".tmp")
    trainer.save_model(str(tmp))  # every process: ZeRO-3 and FSDP gather the weights here
    if trainer.accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    trainer.accelerator.wait_for_everyone()


def run_stage(config: PipelineConfig, stage_name: str, module: StageModule) -> dict:
    """Train one stage (resuming if it was interrupted), save its final checkpoint, evaluate it."""
    from stages.evaluate import evaluate, print_table

    ctx = StageContext(config, config.stage(stage_name))
    # cpu=True without CUDA: else, under torchrun on CPUs, this first PartialState joins no process group and
    # every rank acts as the main one (all write the markers and the base model) until the Trainer's own setup.
    state = PartialState(cpu=not torch.cuda.is_available())
    if check_finished(ctx):
        log.info("stage %s already finished; skipping (%s)", stage_name, ctx.done_marker)
        return json.loads(ctx.done_marker.read_text())
    start = start_dir(config, ctx.stage)
    if state.is_main_process:
        ctx.dir.mkdir(parents=True, exist_ok=True)
        if not ctx.started_marker.exists():
            write_durably(ctx.started_marker, json.dumps({"config_hash": config.stage_hash(stage_name)}))
        stage_started(config, stage_name, resumed_from=_resume_point(ctx))
    state.wait_for_everyone()
    if hasattr(module, "train"):
        steps, metrics = module.train(ctx, start)
    else:
        steps, metrics = train_phase(ctx, start, module.build_trainer)
    tokenizer = load_tokenizer(ctx.final)
    summary: dict[str, Any] = {}
    if state.is_main_process:
        # Evaluate the saved checkpoint, not the trainer's model: under FSDP or ZeRO-3 the latter is
        # sharded across processes and cannot generate on the main process alone.
        model = load_model(ctx.final, dtype=DTYPES[config.model.dtype], whole=True)
        report = evaluate(model, tokenizer, ctx.stage.eval, config.rollout.cuda_graphs)
        report["before"] = evaluation_before(ctx, start)
        (ctx.dir / "eval.json").write_text(json.dumps(report, indent=2))
        print_table(report, title=f"{stage_name}: held-out evaluation")
        summary = {"stage": stage_name, "config_hash": config.stage_hash(stage_name),
                   "steps": steps, "train_metrics": metrics,
                   "eval": report["summary"], "final": str(ctx.final), "started_from": str(start)}
        write_durably(ctx.done_marker, json.dumps(summary, indent=2))
        stage_finished(config, stage_name, summary)
    state.wait_for_everyone()
    return summary


def evaluation_before(ctx: StageContext, start: Path) -> dict[str, Any]:
    """The starting checkpoint's eval summary under this stage's eval settings, for the before/after
    table: the previous stage's own eval when its settings were the same, else evaluated here."""
    from stages.evaluate import evaluate

    previous = ctx.config.previous(ctx.stage.name)
    label = previous.name if previous else "base"
    written = start.parent / "eval.json"
    if previous is not None and previous.eval == ctx.stage.eval and written.exists():
        return {"stage": label, "summary": json.loads(written.read_text())["summary"]}
    model = load_model(start, dtype=DTYPES[ctx.config.model.dtype], whole=True)
    report = evaluate(model, load_tokenizer(start), ctx.stage.eval, ctx.config.rollout.cuda_graphs)
    return {"stage": label, "summary": report["summary"]}


def _resume_point(ctx: StageContext) -> str | None:
    """The checkpoint an interrupted stage goes on from (for the manifest), or None on a fresh start."""
    parts = [ctx.dir, *sorted(ctx.dir.glob("round_*"))]  # a stage of several parts: RPO's rounds
    found = [c for part in parts if (c := last_complete_checkpoint(part / "checkpoints"))]
    return str(found[-1]) if found else None
