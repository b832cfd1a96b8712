"""Build or load a ``NemotronHForCausalLM`` and its tokenizer.

The architecture is transformers' own; this module only picks a named layout (random weights, for the
embedded default and for sizing) or loads a pretrained path or hub name.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, NemotronHConfig, NemotronHForCausalLM
from transformers.integrations import deepspeed as hf_deepspeed

from data_blends.chat import CHAT_TEMPLATE
from model.configs import LAYOUTS, layout


def build_config(name: str, tokenizer=None, **overrides) -> NemotronHConfig:
    """A NemotronHConfig from a named layout; the tokenizer, when given, fixes vocabulary and special ids."""
    kwargs = layout(name) | overrides
    if tokenizer is not None:
        kwargs.update(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    return NemotronHConfig(**kwargs)


def build_model(name: str, tokenizer=None, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None, **overrides):
    """A randomly initialised model of a named layout (deterministic by seed and device), built on
    ``device`` (default: torch's current default device): drawing the random weights of a full-size
    layout takes minutes on a CPU (about 46M parameters a second on two cores) and a second on a GPU."""
    torch.manual_seed(seed)
    with torch.device(device or torch.get_default_device()):
        return NemotronHForCausalLM(build_config(name, tokenizer, **overrides)).to(dtype)


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, *, whole: bool = False):
    """Load pretrained weights from a local directory or a hub name.

    ``whole``: all of the weights on this process even under DeepSpeed ZeRO-3, whose init otherwise splits
    a model loaded after the trainer's setup across the processes, a collective: for a model that one
    process uses alone (the evaluation on the main process would wait forever for the others) or that
    only generates.
    """
    with _zero3_init_off() if whole else contextlib.nullcontext():
        return AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)


@contextlib.contextmanager
def _zero3_init_off() -> Iterator[None]:
    """transformers wraps ``from_pretrained`` in DeepSpeed's ZeRO-3 init whenever a ZeRO-3 config is
    registered with it (a weak reference the trainer's setup leaves behind): unregistered here for the
    load, registered again after."""
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = registered() if registered is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def load_tokenizer(name_or_path: str | Path):
    """Load a tokenizer; one without a chat template gets the project's reasoning-switch template."""
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_layout_name(name: str) -> bool:
    return name in LAYOUTS
