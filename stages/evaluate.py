"""Held-out evaluation after each stage: the embedded test splits, scored by the verifiable rewards.

Each source is answered greedily in each reasoning mode; the completion is scored with the same reward
function GRPO trains on, so the eval and the training signal cannot drift apart. Metrics:
``accuracy`` (math, science, code: share fully correct; math also apart on one-step and multi-step
problems), ``pass_rate`` (instruction following), ``refusal_rate`` on harmful prompts and
``over_refusal_rate`` on benign ones (safety), the mean reward (``reward``; per mode over all sources:
``reward/<mode>``), and the mean response length in tokens. With ``samples`` k > 0, also the mean reward
of k samples per prompt at ``sample_temperature`` (``sampled_reward``; per mode: ``sampled_reward/<mode>``),
seeded, so two checkpoints are compared on the same draws of the sampler.
"""

from __future__ import annotations

from typing import Any

from data_blends import generators
from data_blends.chat import prompt_messages
from rewards import get_reward, summarize
from rewards.common import answer_text
from rewards.safety import is_refusal
from rollout.engine import RolloutEngine
from rollout.sampling import SamplingParams
from stages.config import EvalSpec

ASSISTANT_START = "<|im_start|>assistant\n"


def generate_greedy(engine: RolloutEngine, prompts: list[str], max_new_tokens: int) -> tuple[list[str], list[int]]:
    """Greedy completions (text, number of tokens before the end-of-turn token) from the rollout engine.

    The engine's greedy output equals ``generate()``'s token for token (tests/test_rollout_engine.py), at
    a fraction of the time, so every stage's eval uses it.
    """
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0), progress=True)
    return [o.text for o in outs], [len(o.token_ids) - (o.finish_reason == "stop") for o in outs]


def generate_sampled(engine: RolloutEngine, prompts: list[str], spec: EvalSpec) -> list[str]:
    """``spec.samples`` sampled completions per prompt, prompt by prompt (k in a row for each)."""
    params = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=spec.sample_temperature,
                            seed=spec.seed)
    outs = engine.generate([p for p in prompts for _ in range(spec.samples)], params, progress=True)
    return [o.text for o in outs]


def opened_reply(prompt: str) -> str:
    """What the generation prompt already wrote of the reply (``<think>`` or ``<think></think>``)."""
    return prompt.rsplit(ASSISTANT_START, 1)[-1] if ASSISTANT_START in prompt else ""


def whole_replies(prompts: list[str], texts: list[str]) -> list[str]:
    """Each completion with what its prompt already wrote of the reply, as the rewards read it."""
    return [opened_reply(p) + t for p, t in zip(prompts, texts)]


def reasoning_mode(prompt: str) -> str:
    """``think`` when the generation prompt opened a think block for the model to fill, else ``no_think``."""
    return "think" if opened_reply(prompt) == "<think>" else "no_think"


def sampled_reward(source: str, rows: list[dict], prompts: list[str], texts: list[str], samples: int) -> float:
    """The mean reward of ``samples`` completions per prompt (``texts`` k in a row for each prompt)."""
    rows, prompts = ([x for x in xs for _ in range(samples)] for xs in (rows, prompts))
    return mean_reward(score(source, rows, prompts, whole_replies(prompts, texts)))


def mean_reward(scores: list[float | None]) -> float:
    """The mean verifiable reward, an unscorable reply counting as 0 (as a wrong one does)."""
    return sum(s or 0.0 for s in scores) / len(scores)


def score(source: str, rows: list[dict], prompts: list[str], replies: list[str]) -> list[float | None]:
    """One source's replies scored by its reward, which reads the rows' answer columns."""
    columns = {key: [row[key] for row in rows] for key in ("gold", "tests", "constraints")}
    return get_reward(source)(prompts=prompts, completions=replies, **columns)


def source_metrics(source: str, rows: list[dict], prompts: list[str], replies: list[str]) -> dict[str, float]:
    """Score one source's replies with its reward and turn the scores into the source's metrics."""
    scores = score(source, rows, prompts, replies)
    if source == "safety":
        answers = [answer_text(reply) for reply in replies]
        harmful = [is_refusal(a) for a, row in zip(answers, rows) if row["gold"] == "refuse"]
        benign = [is_refusal(a) for a, row in zip(answers, rows) if row["gold"] == "comply"]
        return {"refusal_rate": sum(harmful) / max(len(harmful), 1),
                "over_refusal_rate": sum(benign) / max(len(benign), 1), "reward": mean_reward(scores)}
    name = "pass_rate" if source == "ifeval" else "accuracy"
    correct = [s is not None and s >= 1.0 for s in scores]
    return ({name: sum(correct) / len(correct)} | step_accuracies(rows, correct)
            | {"unscored": summarize(scores)["unscorable"], "reward": mean_reward(scores)})


def step_accuracies(rows: list[dict], correct: list[bool]) -> dict[str, float]:
    """Accuracy on one-step and on multi-step rows, where rows count their steps (generated math).

    Reasoning pays off only on problems of several steps; a single fact can be answered directly.
    """
    groups = {"accuracy_one_step": [c for c, row in zip(correct, rows) if row["steps"] == 1],
              "accuracy_multi_step": [c for c, row in zip(correct, rows) if row["steps"] > 1]}
    return {key: sum(group) / len(group) for key, group in groups.items() if group}


def evaluate(model: Any, tokenizer: Any, spec: EvalSpec, cuda_graphs: bool = True) -> dict[str, Any]:
    """Answer every held-out source in every mode; returns per-(source, mode) metrics and a flat summary."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    engine = RolloutEngine(model, tokenizer, max_batch=spec.batch_size,
                           max_length=spec.max_length + spec.max_new_tokens, cuda_graphs=cuda_graphs)
    for source in spec.sources:
        rows = generators.generate(source, "test", spec.n_per_source, seed=spec.seed)
        for mode in spec.modes:
            think = mode == "think"
            prompts = [tokenizer.apply_chat_template(prompt_messages(r, think), tokenize=False,
                                                     add_generation_prompt=True) for r in rows]
            texts, lengths = generate_greedy(engine, prompts, spec.max_new_tokens)
            metrics = source_metrics(source, rows, prompts, whole_replies(prompts, texts))
            metrics["mean_length"] = sum(lengths) / len(lengths)
            if spec.samples:
                metrics["sampled_reward"] = sampled_reward(source, rows, prompts,
                                                           generate_sampled(engine, prompts, spec), spec.samples)
            results.setdefault(source, {})[mode] = metrics
    summary = {f"{source}/{mode}/{name}": value for source, modes in results.items()
               for mode, metrics in modes.items() for name, value in metrics.items()}
    for mode in spec.modes:  # every source weighs the same: what GRPO's rewards say of the stage, per mode
        for name in ["reward"] + (["sampled_reward"] if spec.samples else []):
            summary[f"{name}/{mode}"] = sum(results[s][mode][name] for s in spec.sources) / len(spec.sources)
    return {"results": results, "summary": summary, "n_per_source": spec.n_per_source}


def format_table(report: dict[str, Any], title: str) -> str:
    """A fixed-width table: one line per source, one column per (mode, metric)."""
    lines = [title]
    for source, modes in report["results"].items():
        cells = [f"/{mode} " + " ".join(f"{k}={v:.2f}" if k != "mean_length" else f"len={v:.0f}"
                                        for k, v in metrics.items() if k != "unscored")
                 for mode, metrics in modes.items()]
        lines.append(f"  {source:<8} " + " | ".join(cells))
    return "\n".join(lines)


def print_table(report: dict[str, Any], title: str) -> None:
    print(format_table(report, title), flush=True)
