"""GRPO step time with our rollout engine against TRL's built-in generation, measured in one run.

Both trainers run the same steps: same model and weights, prompts, group size, completion length and
seed, with a reward that scores every completion (so no group is skipped and no step differs in work).
Ours generates through ``rollout_func`` with the engine; TRL's generates with ``model.generate()``.
The trainers run ``--repeats`` times each, alternating, and their median step times are compared.

    python -m bench.bench_grpo                          # 16 prompts x 8 generations x 256 new tokens
    python -m bench.bench_grpo --checkpoint runs/tiny/rpo/final      # a trained model: replies stop
    python -m bench.bench_grpo --prompts 4 --new-tokens 32 --steps 2 --repeats 1   # a quick look
    python -m bench.bench_grpo --checkpoint runs/tiny/rpo/final --length-groups 1 --no-share-prompts  # as TRL
"""

from __future__ import annotations

import argparse
import copy
import time
from statistics import median
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from bench.common import bench_tokenizer, header
from data_blends import generators
from data_blends.chat import prompt_messages
from model.factory import build_model, load_model, load_tokenizer
from stages.config import GRPOSpec
from stages.grpo import EngineRollout, GRPOStageTrainer


def length_reward(prompts: list, completions: list, completion_ids: list[list[int]], **_: Any) -> list[float]:
    """A reward every completion gets, varying within a group: its length parity."""
    return [float(len(ids) % 2) for ids in completion_ids]


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, and of the rollouts (generation and scoring) inside it."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.rollouts: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start, self._rollout = time.perf_counter(), 0.0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(time.perf_counter() - self._start)
        self.rollouts.append(self._rollout)

    def timing(self, trainer: GRPOTrainer) -> None:
        """Time the trainer's generate-and-score phase, whichever backend generates."""
        generate_and_score = trainer._generate_and_score_completions

        def timed_phase(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = generate_and_score(*args, **kwargs)
            self._rollout += time.perf_counter() - start
            return out

        trainer._generate_and_score_completions = timed_phase
        trainer.add_callback(self)


def trainer_args(out: str, batch: int, group: int, new_tokens: int, steps: int) -> GRPOConfig:
    """The tiny GRPO stage's trainer settings: fp32, no activation checkpointing (TRL turns both bf16
    autocast and checkpointing on by default, which on CPU only slow the training half of a step)."""
    return GRPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, num_generations=group,
                      bf16=False, activation_checkpointing=False, max_completion_length=new_tokens,
                      learning_rate=1e-5, logging_steps=1, save_strategy="no",
                      report_to=[], use_cpu=not torch.cuda.is_available(), seed=0, temperature=1.0, beta=0.0,
                      mask_truncated_completions=False, vllm_importance_sampling_correction=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="tiny")
    parser.add_argument("--checkpoint", help="a trained checkpoint instead of a random layout")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="the first of each run is a warm-up, not counted")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each trainer, alternating; medians over their steps (a shared CPU's speed drifts)")
    parser.add_argument("--length-groups", type=int, default=GRPOSpec.length_groups,
                        help="groups of rows of similar length in our trainer's forward pass (1: as TRL)")
    parser.add_argument("--share-prompts", action=argparse.BooleanOptionalAction, default=GRPOSpec.share_prompts,
                        help="our trainer runs each distinct prompt once (--no-share-prompts: every copy, as TRL)")
    args = parser.parse_args()

    if args.checkpoint:
        tokenizer, model = load_tokenizer(args.checkpoint), load_model(args.checkpoint)
    else:
        tokenizer = bench_tokenizer()
        model = build_model(args.layout, tokenizer, seed=0)
    rows = generators.generate("math", "test", args.prompts)
    dataset = Dataset.from_list([{"prompt": prompt_messages(r, i % 2 == 0)} for i, r in enumerate(rows)])
    batch = args.prompts * args.group
    spec = GRPOSpec(num_generations=args.group, max_new_tokens=args.new_tokens, dynamic_sampling=False,
                    engine_max_batch=batch, length_groups=args.length_groups, share_prompts=args.share_prompts)
    print(header(f"GRPO step: rollout engine vs TRL generate(); {args.checkpoint or 'layout ' + args.layout}, {args.prompts} prompts x "
                 f"{args.group} generations x {args.new_tokens} new tokens, {args.steps} steps per run, {args.repeats} runs each"))
    timings: dict[str, list[StepTimer]] = {"TRL generate()": [], "rollout engine": []}
    for _ in range(args.repeats):
        for name, timers in timings.items():
            common = dict(model=copy.deepcopy(model), reward_funcs=[length_reward], train_dataset=dataset,
                          processing_class=tokenizer,
                          args=trainer_args(f"/tmp/bench_grpo_{name[:3]}", batch, args.group, args.new_tokens,
                                            args.steps))
            if name == "rollout engine":
                trainer = GRPOStageTrainer(**common, spec=spec,
                                           rollout=EngineRollout(spec, tokenizer, seed=0, max_prompt_length=512))
            else:
                trainer = GRPOTrainer(**common)
            timer = StepTimer()
            timer.timing(trainer)
            trainer.train()
            timers.append(timer)
            print(f"{name:>16}: step times {', '.join(f'{t:.1f} s' for t in timer.steps)}; generation and scoring "
                  f"{', '.join(f'{t:.1f} s' for t in timer.rollouts)}", flush=True)
    skip = 1 if args.steps > 1 else 0  # the first step of each run pays one-off costs (allocator, first compile)

    def medians(timers: list[StepTimer]) -> tuple[float, float, float]:
        """Median step, rollout (generation and scoring) and training time over the counted steps."""
        steps = [(t, r) for timer in timers for t, r in zip(timer.steps[skip:], timer.rollouts[skip:])]
        return median(t for t, _ in steps), median(r for _, r in steps), median(t - r for t, r in steps)

    (trl_step, trl_rollout, trl_training), (our_step, our_rollout, our_training) = map(medians, timings.values())
    print(f"median step{' after the first of each run' if skip else ''}: TRL generate() {trl_step:.2f} s (training "
          f"{trl_training:.2f} s), rollout engine {our_step:.2f} s (training {our_training:.2f} s, length groups "
          f"{spec.length_groups}, shared prompts {'on' if spec.share_prompts else 'off'})")
    print(f"generation and scoring: TRL generate() {trl_rollout:.2f} s, rollout engine {our_rollout:.2f} s "
          f"({trl_rollout / our_rollout:.1f}x)")
    print(f"GRPO step speed-up with the rollout engine: {trl_step / our_step:.1f}x "
          f"(with generation and scoring free, the training alone would bound it at {trl_step / our_training:.1f}x)")


if __name__ == "__main__":
    main()
