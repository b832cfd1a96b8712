"""Shared pieces of the benchmarks: a tokenizer and chat prompts built from the embedded generators."""

from __future__ import annotations

import platform
import time
from datetime import date
from typing import Any

import torch

from data_blends import generators
from data_blends.chat import conversation, prompt_messages
from model.tokenizer import train_tokenizer


def bench_tokenizer(vocab_size: int = 512) -> Any:
    """The embedded default's kind of tokenizer, trained on a small sample of the embedded tasks."""
    rows = [row for source in generators.SOURCES_GENERATED for row in generators.generate(source, "train", 60)]
    texts = [m["content"] for row in rows for think in (True, False) for m in conversation(row, think)]
    return train_tokenizer(texts, vocab_size=vocab_size)


def chat_prompts(tokenizer: Any, n: int, seed: int = 0) -> list[list[int]]:
    """n held-out prompts of mixed sources and lengths, alternating /think and /no_think, as token ids."""
    rows = [row for source in generators.SOURCES_GENERATED for row in generators.generate(source, "test", n, seed)]
    rows = [rows[(i * 7919) % len(rows)] for i in range(n)]
    return [tokenizer.apply_chat_template(prompt_messages(row, i % 2 == 0), add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for i, row in enumerate(rows)]


def header(title: str) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"
    return f"# {title}\n# device: {device}; date: {date.today()}; torch {torch.__version__}"


def timed(fn: Any) -> tuple[Any, float]:
    """fn() and its wall time in seconds (synchronising CUDA around it)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start
