"""SFT stage (used by both ``sft_reasoning`` and ``sft_chat``), on TRL's SFTTrainer.

The blend is rendered with the chat template in the mode each example was assigned (/think or
/no_think) and tokenized here, with a mask that keeps the loss on assistant tokens only; TRL turns the
mask into labels. Packing is refused unless the model's Mamba path resets its state at example
boundaries (see ``model.packing``).
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTConfig, SFTTrainer

from data_blends.blend import build_examples
from data_blends.chat import conversation, tokenize_conversation
from model.packing import packing_is_exact
from stages.runner import StageContext, trainer_arguments
from stages.schema import ConfigError


def tokenized_dataset(ctx: StageContext, tokenizer: Any) -> Dataset:
    """The stage's blend as token ids plus the assistant mask, truncated to ``max_length``."""
    max_length = ctx.stage.trainer.max_length
    rows = []
    for example in build_examples(ctx.stage.blend_spec):
        encoded = tokenize_conversation(tokenizer, conversation(example.row, example.think))
        if sum(encoded["assistant_masks"][:max_length]) == 0:
            continue  # nothing left to learn after truncation
        rows.append({k: v[:max_length] for k, v in encoded.items()})
    return Dataset.from_list(rows)


def training_args(ctx: StageContext) -> SFTConfig:
    spec = ctx.stage.trainer
    return SFTConfig(
        **trainer_arguments(ctx),
        max_length=spec.max_length,
        packing=spec.packing,
        padding_free=spec.packing,
        train_sampling_strategy="group_by_length" if spec.group_by_length else "random",
        include_num_input_tokens_seen=True,
        completion_only_loss=False,  # the assistant mask already selects the trained tokens
    )


class LengthGroupedSFTTrainer(SFTTrainer):
    """SFTTrainer whose length groups are cut from the global batch, so N processes train like one."""

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            # transformers sizes the length-sorted mega-batches by the per-device batch, so one global batch
            # split over 2 processes would see the data in another order than on 1. Every process draws the
            # same permutation (same seed), and accelerate gives process r the r-th per-device slice of each
            # global batch: with global-batch groups, a step trains on the same examples at any world size.
            sampler.batch_size *= self.args.world_size
        return sampler


def build_trainer(ctx: StageContext, model: torch.nn.Module, tokenizer: Any) -> SFTTrainer:
    if ctx.stage.trainer.packing and not packing_is_exact(model):
        raise ConfigError(
            f"stage {ctx.stage.name!r}: trainer.packing is true, but this model's Mamba layers carry state "
            "across packed examples (no sequence-index support in the installed kernels); set packing: false"
        )
    with PartialState().main_process_first():
        dataset = tokenized_dataset(ctx, tokenizer)
    return LengthGroupedSFTTrainer(model=model, args=training_args(ctx), train_dataset=dataset,
                                   processing_class=tokenizer)
