"""The embedded default's tokenizer: a small byte-level BPE trained locally on the embedded corpus.

Digits are split one per token so arithmetic traces line up column by column, and the chat markers and
think tags are special tokens so they never merge with text. The result is saved as an ordinary
transformers tokenizer, so ``AutoTokenizer.from_pretrained`` reads every checkpoint we write.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data_blends.chat import CHAT_TEMPLATE

PAD, BOS, EOS = "<pad>", "<s>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, "<|im_start|>", EOS, "<think>", "</think>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with single-digit tokens and wrap it with the project's chat template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
