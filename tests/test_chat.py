"""The chat template's reasoning switch and the assistant-only loss mask."""

from __future__ import annotations

from data_blends.chat import conversation, prompt_messages, tokenize_conversation
from data_blends.task import make_row

ROW = make_row(id="r", source="math", prompt="What is 2 + 3?", thinking="2+3=5", answer=r"\boxed{5}")


def test_think_mode_renders_reasoning_inside_think_tags(tokenizer):
    text = tokenizer.apply_chat_template(conversation(ROW, think=True), tokenize=False)
    assert "<|im_start|>system\n/think<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>2+3=5</think>\\boxed{5}<|im_end|>\n")


def test_no_think_mode_has_an_empty_think_block(tokenizer):
    text = tokenizer.apply_chat_template(conversation(ROW, think=False), tokenize=False)
    assert "<|im_start|>system\n/no_think<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think></think>\\boxed{5}<|im_end|>\n")
    assert "2+3=5" not in text


def test_generation_prompt_opens_and_in_no_think_mode_closes_the_think_block(tokenizer):
    think = tokenizer.apply_chat_template(prompt_messages(ROW, True), tokenize=False, add_generation_prompt=True)
    plain = tokenizer.apply_chat_template(prompt_messages(ROW, False), tokenize=False, add_generation_prompt=True)
    assert think.endswith("<|im_start|>assistant\n<think>")
    assert plain.endswith("<|im_start|>assistant\n<think></think>")


def test_mask_covers_exactly_the_reply(tokenizer):
    for think, reply in ((True, "2+3=5</think>\\boxed{5}<|im_end|>\n"), (False, "\\boxed{5}<|im_end|>\n")):
        encoded = tokenize_conversation(tokenizer, conversation(ROW, think))
        ids, mask = encoded["input_ids"], encoded["assistant_masks"]
        assert len(ids) == len(mask)
        assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == reply
        masked_text = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
        assert "What is 2 + 3?" in masked_text and "system" in masked_text
        first = mask.index(1)
        assert all(mask[first:]) and not any(mask[:first])  # one contiguous span at the end


def test_history_turns_are_context_without_reasoning(tokenizer):
    row = make_row(id="h", source="chat", prompt="And 3 + 4?", answer="7", context=[
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "<think>1+1=2</think>2"},
    ])
    encoded = tokenize_conversation(tokenizer, conversation(row, think=True))
    text = tokenizer.decode(encoded["input_ids"])
    assert "1+1=2" not in text and "<think></think>2<|im_end|>" in text
    trained = tokenizer.decode([i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m])
    assert trained == "</think>7<|im_end|>\n"


def test_saved_tokenizer_reloads_with_template(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = conversation(ROW, think=True)
    assert reloaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    assert reloaded.tokenize("4821") == ["4", "8", "2", "1"]
