"""RPOTrainer: TRL's DPOTrainer with the reward-aware preference losses of ``stages.rpo_losses``.

TRL keeps the data path: tokenizing the prompt/chosen/rejected text columns, batching chosen and
rejected into one padded batch, the fused LM head that returns per-token log-probs, and the
precomputation of reference log-probs (``precompute_ref_log_probs``, on by default here, so no
reference model stays in memory). This module adds each pair's rewards (dataset columns
``chosen_reward`` and ``rejected_reward``, see ``data_blends.preference.to_dpo_columns``) and replaces
the loss. DPOTrainer has no hook for the loss alone (its ``_compute_loss`` runs the forward, picks the
loss in an if/elif chain over ``loss_type`` and logs), so ``_compute_loss`` is overridden whole; it
reuses TRL's forward and reference log-prob code.

A dataset that already carries ``ref_chosen_logps``/``ref_rejected_logps`` (TRL's columns: log-probs
summed over the response tokens left after ``max_length`` truncation) is used as it is, e.g. reference
log-probs computed once per RPO round; they must come from the same reference for every pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from stages.rpo_losses import preference_loss, preference_stats

REWARD_COLUMNS = ("chosen_reward", "rejected_reward")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
_NOT_MODEL_INPUTS = {"completion_mask", *REF_COLUMNS, *REWARD_COLUMNS}
# DPOConfig options that only act inside DPOTrainer's own loss, which RPOTrainer replaces.
_DPO_LOSS_OPTIONS = {"loss_type": ["sigmoid"], "loss_weights": None, "ld_alpha": None,
                     "f_divergence_type": "reverse_kl", "use_weighting": False, "label_smoothing": 0.0}


@dataclass
class RPOConfig(DPOConfig):
    """DPOConfig plus the RPO loss settings (NeMo-Aligner's names in brackets); ``beta`` is β."""

    preference_loss: str = field(default="rpo_sq", metadata={"help": "a name in stages.rpo_losses.PREFERENCE_LOSSES"})
    reward_scale: float = field(default=1.0, metadata={"help": "η, the scale of the rewards [gt_reward_scale]"})
    average_log_probs: bool = field(
        default=False, metadata={"help": "average log-probs per response token instead of summing them "
                                         "[preference_average_log_probs]; also used for the SFT term"})
    sft_loss_weight: float = field(default=0.0, metadata={"help": "weight of the NLL of the chosen response"})
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "TRL's option; on, so no reference model is kept during training"})

    def __post_init__(self) -> None:
        super().__post_init__()
        preference_loss(self.preference_loss)  # an unknown name fails here, before any model is loaded
        changed = sorted(name for name, default in _DPO_LOSS_OPTIONS.items() if getattr(self, name) != default)
        if changed:
            raise ValueError(f"RPOConfig: {changed} only act on DPOTrainer's own loss, which RPOTrainer replaces; "
                             "choose the loss with preference_loss")
        if self.sft_loss_weight < 0:
            raise ValueError(f"RPOConfig: sft_loss_weight must be >= 0, got {self.sft_loss_weight}")


@dataclass
class RewardPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator, plus each pair's two rewards as float tensors of shape (pairs,)."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        for column in REWARD_COLUMNS:
            batch[column] = torch.tensor([float(example[column]) for example in examples])
        return batch


class RPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is ``args.preference_loss`` on (Δπ, Δr), plus an optional SFT term."""

    _name = "RPO"

    def __init__(self, model: PreTrainedModel | str, args: RPOConfig, train_dataset: Dataset,
                 processing_class: PreTrainedTokenizerBase, **kwargs: Any) -> None:
        missing = [c for c in REWARD_COLUMNS if c not in train_dataset.column_names]
        if missing:
            raise ValueError(f"train_dataset has no column(s) {missing}; "
                             "data_blends.preference.to_dpo_columns writes them")
        if processing_class.pad_token is None:  # as DPOTrainer does, but its collator is replaced here
            processing_class.pad_token = processing_class.eos_token
        kwargs.setdefault("data_collator", RewardPreferenceCollator(
            pad_token_id=processing_class.pad_token_id, max_length=args.max_length,
            truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of))
        self.loss_fn = preference_loss(args.preference_loss)
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the reward columns, which TRL's list of model inputs would drop."""
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *REWARD_COLUMNS]

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """Use reference log-probs the dataset already carries instead of computing them again."""
        if all(c in dataset.column_names for c in REF_COLUMNS):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def compute_ref_log_probs(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """TRL's reference forward, without the reward tensors, which it would pass to the model."""
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k not in REWARD_COLUMNS})

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        args: RPOConfig = self.args
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        outputs = model(**model_kwargs, labels=labels, use_cache=False, fused_lm_head=True)
        shift_mask = completion_mask[:, 1:]  # log_probs[:, t] scores token t + 1; zero off the response
        logps = outputs.log_probs[:, -shift_mask.size(1):].sum(dim=1)  # (2 * pairs,): chosen, then rejected

        if "ref_chosen_logps" in inputs:  # precomputed by TRL, or carried by the dataset
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(logps)
        else:
            ref_logps = torch.cat(self.compute_ref_log_probs(self.ref_model or self.model, inputs))
        if args.average_log_probs:
            num_tokens = shift_mask.sum(dim=1).clamp(min=1)
            logps, ref_logps = logps / num_tokens, ref_logps / num_tokens
        chosen_logps, rejected_logps = logps.chunk(2)
        chosen_logratios, rejected_logratios = (logps - ref_logps).chunk(2)

        chosen_rewards, rejected_rewards = inputs["chosen_reward"], inputs["rejected_reward"]
        pref_loss = self.loss_fn(chosen_logratios - rejected_logratios, chosen_rewards - rejected_rewards,
                                 self.beta, args.reward_scale).mean()
        sft_loss = -chosen_logps.mean()
        loss = pref_loss + args.sft_loss_weight * sft_loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss

        gather = self.accelerator.gather
        metrics = {
            "preference_loss": gather(pref_loss.detach()).mean().item(),
            "sft_loss": gather(sft_loss.detach()).mean().item(),
            "logps/chosen": gather(chosen_logps.detach()).mean().item(),
            "logps/rejected": gather(rejected_logps.detach()).mean().item(),
            **preference_stats(*gather((chosen_logratios, rejected_logratios, chosen_rewards, rejected_rewards)),
                               beta=self.beta),
        }
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)

        if return_outputs:  # Trainer's prediction_step wants logits, which the fused head does not build
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss
