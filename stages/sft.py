"""SFT stage (used by both ``sft_reasoning`` and ``sft_chat``), on TRL's SFTTrainer.

The blend is rendered with the chat template in the mode each example was assigned (/think or
/no_think) and tokenized here, with a mask that keeps the loss on assistant tokens only; TRL turns the
mask into labels. Packing is refused unless the model's Mamba path resets its state at example
boundaries (see ``model.packing``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from data_blends.blend import build_examples
from data_blends.chat import conversation, tokenize_conversation
from model.packing import packing_is_exact
from stages.runner import StageContext
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
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.dir / "tensorboard")  # transformers' TensorBoard setting
    return SFTConfig(
        output_dir=str(ctx.checkpoints),
        max_steps=spec.max_steps,
        learning_rate=spec.learning_rate,
        per_device_train_batch_size=spec.per_device_train_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        lr_scheduler_type=spec.lr_scheduler_type,
        warmup_steps=spec.warmup_steps,
        weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm,
        max_length=spec.max_length,
        logging_steps=spec.logging_steps,
        save_steps=spec.save_steps,
        save_total_limit=spec.save_total_limit,
        bf16=spec.bf16,
        gradient_checkpointing=spec.gradient_checkpointing,
        packing=spec.packing,
        padding_free=spec.packing,
        train_sampling_strategy="group_by_length" if spec.group_by_length else "random",
        dataloader_num_workers=spec.dataloader_num_workers,
        seed=ctx.config.seed,
        data_seed=ctx.config.seed,
        report_to=["tensorboard"],
        include_num_input_tokens_seen=True,
        completion_only_loss=False,  # the assistant mask already selects the trained tokens
        save_only_model=False,
        use_cpu=not torch.cuda.is_available(),
    )


def build_trainer(ctx: StageContext, model: torch.nn.Module, tokenizer: Any) -> SFTTrainer:
    if ctx.stage.trainer.packing and not packing_is_exact(model):
        raise ConfigError(
            f"stage {ctx.stage.name!r}: trainer.packing is true, but this model's Mamba layers carry state "
            "across packed examples (no sequence-index support in the installed kernels); set packing: false"
        )
    with PartialState().main_process_first():
        dataset = tokenized_dataset(ctx, tokenizer)
    return SFTTrainer(model=model, args=training_args(ctx), train_dataset=dataset, processing_class=tokenizer)
