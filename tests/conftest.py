"""Shared fixtures: a small tokenizer trained on the bundled rows, and a tiny model built from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_blends.chat import conversation
from data_blends.loaders import read_jsonl
from model.factory import build_model
from model.tokenizer import train_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def sample_rows():
    return list(read_jsonl(FIXTURES / "llama_nemotron_sft_sample.jsonl", "sample"))


@pytest.fixture(scope="session")
def tokenizer(sample_rows):
    corpus = [m["content"] for row in sample_rows for think in (True, False) for m in conversation(row, think)]
    return train_tokenizer(corpus * 10, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return build_model("tiny", tokenizer, seed=0)
