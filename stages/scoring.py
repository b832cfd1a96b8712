"""Scoring replies with the rewards a blend names per source (GRPO's reward functions, RPO's pair choice)."""

from __future__ import annotations

import time
from typing import Any

from rewards import get_reward, summarize, weighted_sum
from stages.evaluate import opened_reply, reasoning_mode


def render(tokenizer: Any, prompt: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


class SourceReward:
    """The weighted sum of one source's rewards, on the full reply text; ``None`` for other sources.

    The reply is rebuilt from the completion's token ids (TRL's decoded text drops special tokens such
    as ``<think>``) and prefixed with what the generation prompt already opened (``<think>`` or the
    empty ``<think></think>`` of /no_think), so rewards see what the model wrote in its turn.
    """

    def __init__(self, source: str, weights: dict[str, float], tokenizer: Any):
        self.__name__ = source
        self.source, self.tokenizer = source, tokenizer
        self.rewards = [get_reward(name) for name in weights]
        self.weights = list(weights.values())
        self.stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}

    def text(self, completion_ids: list[int]) -> str:
        """The completion's text with special tokens kept, less its end-of-turn (or padding) tokens."""
        ids = list(completion_ids)
        while ids and ids[-1] in self.stop_ids:
            ids.pop()
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def reply(self, prompt: list[dict[str, str]], completion_ids: list[int]) -> str:
        return opened_reply(render(self.tokenizer, prompt)) + self.text(completion_ids)

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], source: list[str],
                 log_metric: Any = None, **columns: Any) -> list[float | None]:
        mine = [i for i, s in enumerate(source) if s == self.source]
        scores: list[float | None] = [None] * len(completions)
        if not mine:
            return scores
        start = time.perf_counter()
        pick = lambda values: [values[i] for i in mine]  # noqa: E731
        rendered = [render(self.tokenizer, prompts[i]) for i in mine]
        replies = [opened_reply(text) + self.text(completion_ids[i]) for text, i in zip(rendered, mine)]
        kwargs = {k: pick(v) for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
        parts = [reward(prompts=pick(prompts), completions=replies, **kwargs) for reward in self.rewards]
        for i, value in zip(mine, weighted_sum(parts, self.weights)):
            scores[i] = value
        if log_metric is not None:
            log_metric(f"unscorable/{self.source}", summarize([scores[i] for i in mine])["unscorable"])
            log_metric(f"time/scoring_{self.source}_s", time.perf_counter() - start)
            for mode in ("think", "no_think"):  # RL must raise both modes
                values = [scores[i] or 0.0 for i, text in zip(mine, rendered) if reasoning_mode(text) == mode]
                if values:
                    log_metric(f"rewards_by_mode/{self.source}/{mode}", sum(values) / len(values))
        return scores
