"""GRPO stage: TRL's GRPOTrainer with rollouts from our engine and rewards from ``rewards/``.

Three pieces plug into TRL rather than replacing its loop:

* ``EngineRollout`` is the trainer's ``rollout_func``: it renders the chat prompts, generates every
  completion with the rollout engine and returns the sampling log-probabilities. It is also the object
  TRL asks to sync weights after an optimizer step (TRL's hook is named for vLLM), so the engine
  follows the policy in memory, and TRL's importance-sampling correction between engine and trainer
  log-probabilities applies to it. With one optimizer step per rollout, the trainer's log-probabilities
  for that correction come from the loss's own forward pass, not from a second pass over the batch.
* ``SourceReward`` (``stages.scoring``), one per data source, so TRL logs the mean reward of each.
* ``GRPOStageTrainer`` adds dynamic sampling: groups whose completions all scored the same carry no
  gradient and are replaced by fresh prompts until the batch is full. Its training forward pass runs
  rows in length groups, and each distinct prompt once for all the rows that carry it.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import Cache, DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl import GRPOConfig, GRPOTrainer

from data_blends.blend import build_examples
from data_blends.chat import prompt_messages
from rollout.engine import RolloutEngine
from rollout.sampling import SamplingParams
from stages.config import GRPOSpec
from stages.evaluate import reasoning_mode
from stages.runner import StageContext, trainer_arguments
from stages.scoring import SourceReward, render

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental in TRL


def prompt_dataset(ctx: StageContext) -> Dataset:
    """The blend's rows as conversational prompts in their assigned mode, with the columns rewards read."""
    rows = [{"prompt": prompt_messages(e.row, e.think), "source": e.row["source"], "gold": e.row["gold"],
             "tests": e.row["tests"], "constraints": e.row["constraints"], "reasoning": "on" if e.think else "off"}
            for e in build_examples(ctx.stage.blend_spec, need_trace=False)]
    return Dataset.from_list(rows)


class EngineRollout:
    """TRL ``rollout_func`` backed by the rollout engine, and TRL's weight-sync hook for it."""

    def __init__(self, spec: GRPOSpec, tokenizer: Any, seed: int, max_prompt_length: int, cuda_graphs: bool = True):
        self.spec, self.tokenizer, self.seed, self.cuda_graphs = spec, tokenizer, seed, cuda_graphs
        self.max_length = max_prompt_length + spec.max_new_tokens
        self.engine: RolloutEngine | None = None
        self.trainer: GRPOTrainer | None = None
        self.calls: tuple[int, int] = (-1, 0)  # (global step, calls within it): seeds survive a resume

    def attach(self, trainer: GRPOTrainer) -> None:
        self.trainer = trainer

    def sync_weights(self) -> None:
        """Copy the policy's current weights into the engine, in memory. Under ZeRO-3 or FSDP2 every process
        gathers them parameter by parameter (``rollout.weights``): TRL calls this on every process."""
        if self.engine is not None:
            self.engine.load_weights(self.trainer.accelerator.unwrap_model(self.trainer.model))

    def _engine(self, trainer: GRPOTrainer) -> RolloutEngine:
        if self.engine is None:
            model = trainer.accelerator.unwrap_model(trainer.model)
            self.engine = RolloutEngine(model, self.tokenizer, max_batch=self.spec.engine_max_batch,
                                        max_length=self.max_length, cuda_graphs=self.cuda_graphs)
        return self.engine

    def _seed(self, trainer: GRPOTrainer) -> int:
        step, count = self.calls
        self.calls = (trainer.state.global_step, count + 1 if step == trainer.state.global_step else 0)
        return hash((self.seed, trainer.accelerator.process_index, *self.calls)) % (2**31)

    def __call__(self, prompts: list[list[dict[str, str]]], trainer: GRPOTrainer) -> dict[str, Any]:
        keys = [json.dumps(p, sort_keys=True) for p in prompts]    # each prompt comes num_generations times
        rendered = {key: render(self.tokenizer, p) for key, p in dict(zip(keys, prompts)).items()}
        encoded = {key: self.tokenizer.encode(text, add_special_tokens=False) for key, text in rendered.items()}
        texts, ids = [rendered[k] for k in keys], [encoded[k] for k in keys]
        params = SamplingParams(max_new_tokens=self.spec.max_new_tokens, temperature=self.spec.temperature,
                                seed=self._seed(trainer), thinking_budget=self.spec.thinking_budget)
        engine = self._engine(trainer)
        before, start = dict(engine.seconds), time.perf_counter()
        outs = engine.generate(ids, params)
        trainer._log_metric("time/generation_s", time.perf_counter() - start)
        prefill, decode = (engine.seconds[phase] - before[phase] for phase in ("prefill", "decode"))
        trainer._log_metric("time/generation_prefill_s", prefill)
        if decode > 0:      # each reply's first token comes out of its prompt's prefill, the rest out of decode steps
            new_tokens = sum(len(o.token_ids) for o in outs) - len(outs)
            trainer._log_metric("rollout/decode_tokens_per_s", new_tokens / decode)
        for mode in ("think", "no_think"):
            chosen = [o for o, t in zip(outs, texts) if reasoning_mode(t) == mode]
            if chosen:
                lengths = [len(o.token_ids) for o in chosen]
                trainer._log_metric(f"completions/{mode}/mean_length", sum(lengths) / len(lengths))
                trainer._log_metric(f"completions/{mode}/max_length", max(lengths))
                trainer._log_metric(f"completions/{mode}/truncated",
                                    sum(o.finish_reason == "length" for o in chosen) / len(chosen))
        return {"prompt_ids": [o.prompt_ids for o in outs], "completion_ids": [o.token_ids for o in outs],
                "logprobs": [o.logprobs for o in outs]}


def informative_rows(advantages: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per row: does its group carry signal (not every advantage exactly 0, i.e. rewards not all equal)?"""
    groups = advantages.view(-1, group_size)
    return (groups != 0).any(dim=1).repeat_interleave(group_size)


def importance_ratio(trainer_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor,
                     mode: str, cap: float) -> torch.Tensor:
    """The engine-to-trainer importance weight, (B, T) per token or (B, 1) per sequence, as TRL defines it.

    ``*_truncate`` caps the weight at ``cap``; ``*_mask`` zeroes the weight of tokens (or sequences) above
    it. Tokens without an engine log-probability (NaN) get weight 1.
    """
    gap = torch.nan_to_num((trainer_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        gap = gap.sum(dim=-1, keepdim=True)
    ratio = torch.exp(gap)
    return ratio.clamp(max=cap) if mode.endswith("truncate") else ratio.masked_fill(ratio > cap, 0.0)


def resample_groups(missing: int, batch: int) -> int:
    """How many fresh groups to draw for ``missing`` dropped ones: twice as many, so that one round
    usually suffices when a few groups carry no signal, and never more than a whole batch."""
    return min(2 * missing, batch)


def fewest_cells_split(first: torch.Tensor, last: torch.Tensor, groups: int) -> list[int]:
    """Boundaries ``[0, ..., n]`` that cut n rows, in their given order, into at most ``groups`` runs of
    consecutive rows with the fewest cells in all: a run costs its rows times the columns from its
    earliest ``first`` to its latest ``last``. Dynamic programming over every cut: a few [n, n] ops per group.
    """
    n, inf = len(first), float("inf")
    rows = torch.arange(n, device=first.device)
    run = rows[:, None] <= rows[None]                                  # [i, k]: rows i..k form a run
    hi = torch.where(run, last[None].double(), -inf).cummax(dim=1).values
    lo = torch.where(run, first[None].double(), inf).cummin(dim=1).values
    cells = torch.where(run, (rows[None] - rows[:, None] + 1) * (hi - lo + 1), inf)
    best = torch.full((n + 1,), inf, dtype=torch.float64, device=first.device)
    best[0] = 0.0                                                      # best[j]: fewest cells for rows 0..j-1
    starts = []                                                        # per group: where its run ending at k starts
    for _ in range(groups):
        value, start = (best[:-1, None] + cells).min(dim=0)
        new = value < best[1:]                                         # else one group fewer does as well
        starts.append(torch.where(new, start, -1))
        best = torch.cat([best[:1], torch.where(new, value, best[1:])])
    bounds = [n]
    for start in reversed(starts):
        begin = int(start[bounds[-1] - 1]) if bounds[-1] else -1
        if begin >= 0:
            bounds.append(begin)
    return bounds[::-1]


def length_groups(attention_mask: torch.Tensor, completion_width: int,
                  groups: int) -> list[tuple[torch.Tensor, slice, int]]:
    """Rows sorted by length and cut into at most ``groups`` groups where that runs the fewest padded
    cells, so that each group can run without the padding it does not need.

    ``attention_mask`` [batch, prompt + completion] has prompts left-padded and completions right-padded
    (TRL's layout; the last ``completion_width`` columns are the completion). Per group: its row indices,
    the column span holding every real token of those rows, and how many completion columns that span
    keeps (at least 1).
    """
    width = attention_mask.shape[1]
    columns = torch.arange(width, device=attention_mask.device)
    real = attention_mask.bool()
    first = torch.where(real, columns, width).min(dim=1).values
    last = torch.where(real, columns, -1).max(dim=1).values.clamp(min=width - completion_width)
    order = torch.argsort(last - first, stable=True)
    bounds = fewest_cells_split(first[order], last[order], min(groups, len(order)))
    out = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        rows = order[begin:end]
        stop = int(last[rows].max()) + 1
        out.append((rows, slice(int(first[rows].min()), stop), stop - (width - completion_width)))
    return out


def ungroup(parts: list[torch.Tensor], groups: list[tuple[torch.Tensor, slice, int]], width: int) -> torch.Tensor:
    """Per-group [rows, kept completion columns] values back in the batch's row order, right-padded with
    zeros to ``width`` completion columns."""
    padded = torch.cat([torch.nn.functional.pad(part, (0, width - part.shape[1])) for part in parts])
    order = torch.cat([rows for rows, _, _ in groups])
    return padded[torch.argsort(order)]


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first row holding each distinct prompt, and per row the index of its prompt among those."""
    _, owner = torch.unique(prompt_ids.masked_fill(prompt_mask == 0, -1), dim=0, return_inverse=True)
    rows = torch.arange(len(owner), device=owner.device)
    first = torch.full((int(owner.max()) + 1,), len(owner), device=owner.device)
    return first.scatter_reduce(0, owner, rows, "amin"), owner


def cache_rows(cache: Cache, rows: torch.Tensor, config: Any) -> DynamicCache:
    """A new cache holding the states of ``rows`` of ``cache``: conv and SSM states of the Mamba layers,
    keys and values of the attention layers. Selected, not copied, so gradients flow back into ``cache``.

    ``index_select``, not ``state[rows]``: rows repeat (the copies of a prompt), and the backward of advanced
    indexing on a multithreaded CPU adds their gradients with atomic adds in no fixed order, so two runs of
    a stage would drift apart in the last bits; ``index_select``'s backward adds them in order."""
    out = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            if cache.get_conv_state(i) is not None:
                out.update_conv_state(cache.get_conv_state(i).index_select(0, rows), i)
                out.update_recurrent_state(cache.get_recurrent_state(i).index_select(0, rows), i)
        elif isinstance(layer, DynamicLayer) and layer.get_seq_length() > 0:
            out.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), i)
    return out


LEFT_PADDED = ("prompt_ids", "prompt_mask")


def merge_batches(parts: list[dict[str, Any]], rows: list[torch.Tensor], size: int) -> dict[str, Any]:
    """Concatenate the chosen rows of several scored batches into one of ``size`` rows.

    Prompts are left-padded and everything per token right-padded, as TRL builds them; the token count
    ``num_items_in_batch`` is left to the caller, since it spans all processes.
    """
    merged: dict[str, Any] = {}
    for key in parts[0]:
        if key == "num_items_in_batch":
            continue
        pieces = [part[key][keep] for part, keep in zip(parts, rows)]
        if pieces[0].dim() > 1:
            width = max(p.shape[1] for p in pieces)
            side = (1, 0) if key in LEFT_PADDED else (0, 1)
            pieces = [torch.nn.functional.pad(p, tuple(s * (width - p.shape[1]) for s in side)) for p in pieces]
        merged[key] = torch.cat(pieces)[:size]
    return merged


class GRPOStageTrainer(GRPOTrainer):
    """GRPOTrainer with the rollout engine as its generation backend and dynamic sampling."""

    def __init__(self, *args: Any, rollout: EngineRollout, spec: GRPOSpec, **kwargs: Any):
        super().__init__(*args, rollout_func=rollout, **kwargs)
        rollout.attach(self)
        self.spec = spec
        # TRL applies its importance-sampling correction and weight sync to an external generation
        # backend it calls vLLM; ours takes that role.
        self.use_vllm, self.vllm_generation, self._last_loaded_step = True, rollout, -1
        self.vllm_importance_sampling_correction = spec.importance_sampling
        self._scoring: dict[str, Any] | None = None  # a deferred batch, between _compute_loss and its forward
        self.shared_prompt_tokens = 0  # prompt tokens the training forward ran once for all their copies

    def _defers_importance_sampling(self) -> bool:
        """Is the policy that scores a batch in the loss the one that generated it (one update per rollout)?

        Then the trainer's log-probabilities at generation time equal the loss's own forward pass, and the
        importance weight is computed there (``_get_per_token_logps_and_entropies``) instead of in the
        extra no-grad forward pass TRL runs over the whole batch.
        """
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.spec.importance_sampling and self.args.gradient_accumulation_steps % generate_every == 0

    def _get_per_token_logps_and_entropies(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                           logits_to_keep: int, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        """TRL's forward pass, run per group of rows of similar length (``length_groups``), each cut to the
        columns its rows use: a batch padded to its longest completion costs little more than its tokens.
        Where rows share prompts (a GRPO group), each distinct prompt runs once (``_shared_prompt_parts``)."""
        parts, groups = (self._shared_prompt_parts(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
                         or self._grouped_parts(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs))
        logps = ungroup([p[0] for p in parts], groups, logits_to_keep)
        entropies = None if parts[0][1] is None else ungroup([p[1] for p in parts], groups, logits_to_keep)
        aux = None if parts[0][2] is None else torch.stack([p[2] for p in parts]).mean()
        if self._scoring is not None:  # the loss's forward pass of a deferred batch: weigh it now
            inputs, self._scoring = self._scoring, None
            inputs["importance_sampling_ratio"] = self._weigh(logps.detach(), inputs)
        return logps, entropies, aux

    def _grouped_parts(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                       *args: Any, **kwargs: Any) -> tuple[list, list]:
        """TRL's own forward pass on each length group, every row with its whole prompt."""
        groups = length_groups(attention_mask, logits_to_keep, self.spec.length_groups)
        return [super(GRPOStageTrainer, self)._get_per_token_logps_and_entropies(
            model, input_ids[rows, cols], attention_mask[rows, cols], keep, *args, **kwargs)
            for rows, cols, keep in groups], groups

    def _shared_prompt_parts(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             logits_to_keep: int, batch_size: int | None = None, compute_entropy: bool = False,
                             compute_aux_loss: bool = False, **media: Any) -> tuple[list, list] | None:
        """The forward pass with each distinct prompt run once: all but its last token fill a cache (Mamba
        conv and SSM states, attention keys and values), and each row continues from its prompt's states
        with that last token and its completion, in length groups. Exact up to float rounding, and with
        GRPO's copies of each prompt it runs about half the tokens when prompts are as long as replies.

        None where it does not apply: no repeated prompt, a one-token prompt, a model input beyond text,
        activation checkpointing with gradients (transformers drops the cache of a checkpointed layer), or
        DeepSpeed ZeRO-3, whose fetching of partitioned weights does not survive the prompts' pass (it runs
        the LM head module; the fused-head passes after it read the head's weight directly): with DeepSpeed
        0.19 the step stops on a weight still in flight or still partitioned.
        """
        tail = input_ids.shape[1] - logits_to_keep - 1       # the prompts' last column starts the continuation
        unwrapped = self.accelerator.unwrap_model(model)
        if (not self.spec.share_prompts or tail < 1 or compute_aux_loss or any(v is not None for v in media.values())
                or (torch.is_grad_enabled() and unwrapped.is_activation_checkpointing) or is_deepspeed_zero3_enabled()
                or not attention_mask[:, tail].all()):
            return None
        leaders, owner = distinct_prompts(input_ids[:, :tail + 1], attention_mask[:, :tail + 1])
        if len(leaders) == len(owner):
            return None
        start = int(attention_mask[leaders, :tail].argmax(dim=1).min())  # leading columns that are all padding
        cache = DynamicCache(config=unwrapped.config)
        with self.accelerator.autocast():
            model(input_ids=input_ids[leaders, start:tail], attention_mask=attention_mask[leaders, start:tail],
                  cache=cache, use_cache=True, logits_to_keep=1)
        self.shared_prompt_tokens += int(attention_mask[leaders, start:tail].sum())
        groups = length_groups(attention_mask[:, tail:], logits_to_keep, self.spec.length_groups)
        parts = []
        for group, cols, keep in groups:
            outs = []
            for rows in group.split(batch_size or len(group)):  # TRL's micro-batches bound the memory of a pass
                ids, mask = input_ids[rows, tail:][:, cols], attention_mask[rows, tail:][:, cols]
                labels = ids.masked_fill(mask == 0, -100)
                labels[:, 0] = -100                           # the prompt's last token is context, not scored
                context = torch.cat([attention_mask[rows, start:tail], mask], dim=1)  # the cached prefix, then ids
                with self.accelerator.autocast():
                    outs.append(model(input_ids=ids, attention_mask=context, labels=labels, fused_lm_head=True,
                                      cache=cache_rows(cache, owner[rows], unwrapped.config)))
            parts.append((torch.cat([o.log_probs[:, -keep:] for o in outs]),
                          torch.cat([o.entropy[:, -keep:] for o in outs]) if compute_entropy else None, None))
        return parts, groups

    def _weigh(self, trainer_logps: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """The importance weight of a micro-batch, logging what TRL logs for it."""
        mask = inputs["completion_mask"]
        sampling = inputs["sampling_per_token_logps"]
        ratio = importance_ratio(trainer_logps, sampling, mask, self.spec.importance_sampling_mode,
                                 self.spec.importance_sampling_cap)
        delta = (trainer_logps - sampling).abs()[mask.bool()]
        kept = ratio.flatten() if self.spec.importance_sampling_mode.startswith("sequence") else ratio[mask.bool()]
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name, values in (("sampling_logp_difference", delta), ("importance_sampling_ratio", kept)):
            values = values if values.numel() else torch.zeros(1, device=mask.device)
            metrics[f"sampling/{name}/mean"].append(self.accelerator.gather(values.mean()).mean().item())
            metrics[f"sampling/{name}/max"].append(self.accelerator.gather(values.max()).max().item())
        return ratio

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        self._scoring = inputs if self._defers_importance_sampling() else None
        return super()._compute_loss(model, inputs)

    def _fresh_inputs(self, count: int, attempt: int) -> list[dict[str, Any]]:
        """``count`` prompts, each repeated for a group, drawn deterministically from (step, attempt)."""
        rng = random.Random(f"{self.args.seed}-{self.state.global_step}-{attempt}-{self.accelerator.process_index}")
        rows = [self.train_dataset[rng.randrange(len(self.train_dataset))] for _ in range(count)]
        return [dict(row) for row in rows for _ in range(self.num_generations)]

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        # A deferred batch leaves TRL's correction off while it scores, on again for the loss.
        deferred = self._defers_importance_sampling()  # implies spec.importance_sampling
        self.vllm_importance_sampling_correction = self.spec.importance_sampling and not deferred
        try:
            output = self._generate_and_score_batch(inputs)
        finally:
            self.vllm_importance_sampling_correction = self.spec.importance_sampling
        return output

    def _generate_and_score_batch(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        if not (self.spec.dynamic_sampling and self.model.training):
            return output
        size, group = len(inputs), self.num_generations
        if size % group:
            raise ValueError(f"dynamic sampling needs whole groups per process: {size} rows, groups of {group}")
        parts, keeps = [output], [informative_rows(output["advantages"], group)]
        self._metrics["train"]["dynamic_sampling/zero_variance_share"].append(1 - keeps[0].float().mean().item())
        attempt = 0
        while attempt < self.spec.max_resample_rounds:
            missing = torch.tensor([size - sum(int(k.sum()) for k in keeps)], device=self.accelerator.device)
            most = int(self.accelerator.gather(missing).max())  # every process draws as many: TRL gathers
            if most <= 0:
                break
            attempt += 1
            fresh = self._fresh_inputs(resample_groups(most // group, size // group), attempt)
            parts.append(super()._generate_and_score_completions(fresh))
            keeps.append(informative_rows(parts[-1]["advantages"], group))
        self._metrics["train"]["dynamic_sampling/resample_rounds"].append(attempt)
        # Still short after the last round: top up with uninformative groups (zero advantage, no gradient).
        keeps.append(~keeps[0])
        parts.append(output)
        merged = merge_batches(parts, keeps, size)
        merged["num_items_in_batch"] = self.accelerator.gather(merged["completion_mask"].sum()).sum()
        return merged


def training_args(ctx: StageContext) -> GRPOConfig:
    grpo = ctx.stage.grpo
    return GRPOConfig(
        **trainer_arguments(ctx),
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_new_tokens,
        temperature=grpo.temperature,
        loss_type=grpo.loss_type,
        scale_rewards=grpo.scale_rewards,
        epsilon=grpo.epsilon,
        epsilon_high=grpo.epsilon_high,
        beta=grpo.beta,
        mask_truncated_completions=grpo.mask_truncated_completions,
        vllm_importance_sampling_correction=grpo.importance_sampling,
        vllm_importance_sampling_mode=grpo.importance_sampling_mode,
        vllm_importance_sampling_clip_max=grpo.importance_sampling_cap,
    )


def reward_functions(ctx: StageContext, tokenizer: Any) -> list[SourceReward]:
    return [SourceReward(s.name, s.rewards, tokenizer) for s in ctx.stage.blend_spec.sources if s.rewards]


def build_trainer(ctx: StageContext, model: torch.nn.Module, tokenizer: Any) -> GRPOStageTrainer:
    with PartialState().main_process_first():
        dataset = prompt_dataset(ctx)
    rollout = EngineRollout(ctx.stage.grpo, tokenizer, ctx.config.seed, ctx.stage.trainer.max_length,
                            ctx.config.rollout.cuda_graphs)
    return GRPOStageTrainer(model=model, args=training_args(ctx), train_dataset=dataset, processing_class=tokenizer,
                            reward_funcs=reward_functions(ctx, tokenizer), rollout=rollout, spec=ctx.stage.grpo)
