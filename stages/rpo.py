"""RPO stage: reward-aware preference optimization in rounds, with on-policy pairs.

Each round starts from the previous round's final policy (the stage's starting model for the first),
which is also the round's reference. Its pairs are

* on-policy: for prompts of the blend's generator sources, the round's policy samples K replies with
  the rollout engine; the verifiable rewards the blend names score them; the best and the worst make a
  pair when their reward gap exceeds a margin (a prompt whose K replies tie gives none);
* offline: the blend's jsonl / parquet / hub sources, in NeMo-Aligner's or chosen/rejected form.

Pairs and the reference log-probabilities are computed once per round, before training, and written
to ``round_<r>/pairs.jsonl``: a resumed round trains on exactly the same data, against its reference,
without keeping the reference model in memory. A finished round is never redone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset, load_dataset

from data_blends.blend import build_examples
from data_blends.chat import prompt_messages
from data_blends.preference import PreferencePair, read_pairs, to_dpo_columns
from model.factory import load_model, load_tokenizer
from rollout.engine import RolloutEngine
from rollout.sampling import SamplingParams
from stages.config import RPOSpec
from stages.runner import DTYPES, StageContext, log, train_phase, trainer_arguments
from stages.rpo_trainer import REF_COLUMNS, RPOConfig, RPOTrainer
from stages.scoring import SourceReward, render


def best_and_worst(scores: list[float | None], margin: float) -> tuple[int, int] | None:
    """Indices of the highest and lowest scored replies, if their gap exceeds ``margin``."""
    scored = [(s, i) for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None
    (high, best), (low, worst) = max(scored), min(scored)
    return (best, worst) if high - low > margin else None


def on_policy_pairs(ctx: StageContext, start: Path, round_index: int) -> list[tuple[PreferencePair, bool]]:
    """Sample K replies per prompt from the policy at ``start``; keep (best, worst) pairs, with their mode.

    Each process samples and scores its own slice of the prompts; every process gets all the pairs, in the
    order, and with the samples, of one process doing it all. A collective: every process calls it."""
    spec: RPOSpec = ctx.stage.rpo
    sources = {s.name: s for s in ctx.stage.blend_spec.sources if s.kind == "generator" and s.rewards}
    prompt_blend = dataclasses.replace(ctx.stage.blend_spec, sources=list(sources.values()))
    examples = build_examples(prompt_blend, need_trace=False)
    random.Random(f"{ctx.config.seed}-rpo-{round_index}").shuffle(examples)
    examples = examples[: spec.prompts_per_round]
    if not examples:
        return []
    tokenizer = load_tokenizer(start)
    engine = RolloutEngine(load_model(start, dtype=DTYPES[ctx.config.model.dtype], whole=True), tokenizer,
                           max_batch=spec.engine_max_batch,
                           max_length=ctx.stage.trainer.max_length + spec.max_new_tokens,
                           cuda_graphs=ctx.config.rollout.cuda_graphs)
    state = PartialState()
    share = -(-len(examples) // state.num_processes)
    first = state.process_index * share
    examples = examples[first : first + share]
    prompts = [prompt_messages(e.row, e.think) for e in examples]
    repeated = [p for p in prompts for _ in range(spec.samples_per_prompt)]
    params = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
                            seed=ctx.config.seed + round_index)
    outs = (engine.generate([render(tokenizer, p) for p in repeated], params, progress=True,
                            first_index=first * spec.samples_per_prompt) if repeated else [])
    pairs = []
    for i, (example, prompt) in enumerate(zip(examples, prompts)):
        group = outs[i * spec.samples_per_prompt : (i + 1) * spec.samples_per_prompt]
        row = example.row
        reward = SourceReward(row["source"], sources[row["source"]].rewards, tokenizer)
        n = len(group)
        scores = reward(prompts=[prompt] * n, completions=[""] * n, completion_ids=[o.token_ids for o in group],
                        source=[row["source"]] * n, gold=[row["gold"]] * n, tests=[row["tests"]] * n,
                        constraints=[row["constraints"]] * n, reasoning=["on" if example.think else "off"] * n)
        chosen = best_and_worst(scores, spec.reward_margin)
        if chosen is not None:
            best, worst = chosen
            replies = [reward.reply(prompt, group[k].token_ids) for k in (best, worst)]
            pairs.append((PreferencePair(prompt, *replies, scores[best], scores[worst], row["source"]),
                          example.think))
    return gather_object(pairs)      # one process: the list itself


def offline_pairs(ctx: StageContext) -> list[tuple[PreferencePair, bool]]:
    """The blend's preference files and hub datasets, each pair in the mode its chosen reply fits."""
    spec: RPOSpec = ctx.stage.rpo
    pairs = []
    for source in ctx.stage.blend_spec.sources:
        if source.kind == "generator":
            continue
        for pair in read_pairs(source.kind, source.path, source.name, source.split, source.subset, source.max_rows,
                               tuple(spec.default_rewards)):
            pairs.append((pair, "<think>" in pair.chosen and "<think></think>" not in pair.chosen))
    return pairs


def candidate_rows(ctx: StageContext, start: Path, round_index: int) -> list[dict[str, Any]]:
    """The round's pairs, on-policy and offline, as DPO text columns with their rewards."""
    tokenizer = load_tokenizer(start)
    rows = []
    for pair, think in on_policy_pairs(ctx, start, round_index) + offline_pairs(ctx):
        try:
            rows.append(to_dpo_columns(pair, tokenizer, think))
        except ValueError as error:  # a reply that reasons under /no_think cannot be rendered
            log.warning("skipping a pair: %s", error)
    if not rows:
        raise RuntimeError(f"{ctx.dir}: no preference pairs this round (all replies tied within the margin)")
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def round_dataset(ctx: StageContext, start: Path, round_index: int) -> Dataset:
    """The round's pairs with rewards and reference log-probabilities, made once.

    The processes sample the pairs together, the main one writing them (``candidates.jsonl``); then every
    process builds TRL's trainer, whose reference pass splits the pairs between the processes and meets
    them in collectives. It reads the pairs from a file in the round's directory, so that the cache file
    TRL writes the log-probabilities to is one that every process can read, not the main process's
    temporary directory.
    """
    path, candidates = ctx.dir / "pairs.jsonl", ctx.dir / "candidates.jsonl"
    state = PartialState()
    if not path.exists():
        if not candidates.exists():        # the same answer on every process: none writes it before all sampled
            # Every process renders the same rows, so that an error (no pairs) stops them all instead of
            # leaving the others in the barrier below.
            rows = candidate_rows(ctx, start, round_index)
            if state.is_main_process:
                ctx.dir.mkdir(parents=True, exist_ok=True)
                write_rows(candidates, rows)
        state.wait_for_everyone()
        dataset = load_dataset("json", data_files=str(candidates), split="train", cache_dir=str(ctx.dir / "cache"))
        # The reference log-probabilities: TRL computes them with the round's starting policy.
        reference = rpo_trainer(ctx, load_model(start, dtype=DTYPES[ctx.config.model.dtype]), load_tokenizer(start),
                                dataset)
        if state.is_main_process:
            rows = read_rows(candidates)
            for column in REF_COLUMNS:
                for row, value in zip(rows, reference.train_dataset[column]):
                    row[column] = value
            write_rows(path, rows)
        state.wait_for_everyone()
        if state.is_main_process:
            shutil.rmtree(ctx.dir / "cache", ignore_errors=True)    # the tokenized copies, read and done with
    return Dataset.from_list(read_rows(path))


def training_args(ctx: StageContext) -> RPOConfig:
    rpo = ctx.stage.rpo
    return RPOConfig(
        **trainer_arguments(ctx),
        max_length=ctx.stage.trainer.max_length,
        beta=rpo.beta,
        preference_loss=rpo.loss,
        reward_scale=rpo.eta,
        average_log_probs=rpo.average_log_probs,
        sft_loss_weight=rpo.sft_weight,
        precompute_ref_log_probs=True,
    )


def rpo_trainer(ctx: StageContext, model: torch.nn.Module, tokenizer: Any, dataset: Dataset) -> RPOTrainer:
    return RPOTrainer(model=model, args=training_args(ctx), train_dataset=dataset, processing_class=tokenizer)


def accuracy_trend(metrics_file: Path) -> dict[str, float]:
    """First and last logged preference accuracy of a round."""
    values = [e["accuracy"] for e in map(json.loads, metrics_file.read_text().splitlines()) if "accuracy" in e]
    return {"accuracy_first": values[0], "accuracy_last": values[-1]} if values else {}


def train(ctx: StageContext, start: Path) -> tuple[int, dict]:
    """Run the rounds (skipping finished ones), then hand the last round's policy on as the stage's final."""
    steps, rounds = 0, []
    for index in range(ctx.stage.rpo.rounds):
        part = ctx.round(index)
        if not part.done_marker.exists():
            dataset = round_dataset(part, start, index)
            round_steps, metrics = train_phase(part, start, lambda c, m, t: rpo_trainer(c, m, t, dataset))
            summary = {"round": index, "pairs": len(dataset), "steps": round_steps, "train_metrics": metrics,
                       **accuracy_trend(part.dir / "metrics.jsonl")}
            if PartialState().is_main_process:
                part.done_marker.write_text(json.dumps(summary, indent=2))
            PartialState().wait_for_everyone()      # then every process reads the marker
        summary = json.loads(part.done_marker.read_text())
        log.info("rpo round %d: %d pairs, preference accuracy %.2f -> %.2f", index, summary["pairs"],
                 summary.get("accuracy_first", float("nan")), summary.get("accuracy_last", float("nan")))
        rounds.append(summary)
        steps += summary["steps"]
        start = part.final
    if PartialState().is_main_process:
        tmp = ctx.final.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(start, tmp)
        shutil.rmtree(ctx.final, ignore_errors=True)
        os.replace(tmp, ctx.final)
    PartialState().wait_for_everyone()
    return steps, {"rounds": rounds}
