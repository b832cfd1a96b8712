"""Eval metrics come from the real rewards; a reply is scored together with the think tags the prompt opened."""

from __future__ import annotations

from data_blends import generators
from stages.config import EvalSpec
from stages.evaluate import evaluate, format_table, opened_reply, sampled_reward, source_metrics


def test_opened_reply_is_the_part_of_the_reply_the_prompt_wrote():
    assert opened_reply("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>") == "<think>"
    assert opened_reply("x<|im_start|>assistant\n<think></think>") == "<think></think>"


def test_math_accuracy_counts_only_correct_final_answers():
    rows = generators.generate("math", "test", 4, seed=3)
    replies = [f"<think>{r['thinking']}</think>The answer is \\boxed{{{r['gold']}}}." for r in rows[:3]]
    replies.append("<think>guess</think>The answer is \\boxed{1}.")
    metrics = source_metrics("math", rows, ["p"] * 4, replies)
    assert metrics["accuracy"] == 0.75 and metrics["unscored"] == 0.0
    assert metrics["reward"] == 0.75


def test_math_accuracy_is_also_reported_apart_for_one_step_and_multi_step_problems():
    rows = generators.generate("math", "test", 60, seed=3)
    one = [r for r in rows if r["steps"] == 1]
    assert one and len(one) < len(rows)
    # one-step problems answered right, multi-step ones wrong: the split must tell them apart
    replies = [f"<think></think>The answer is \\boxed{{{r['gold'] if r['steps'] == 1 else -1}}}." for r in rows]
    metrics = source_metrics("math", rows, ["p"] * len(rows), replies)
    assert metrics["accuracy_one_step"] == 1.0 and metrics["accuracy_multi_step"] == 0.0
    assert metrics["accuracy"] == len(one) / len(rows)
    code = generators.generate("code", "test", 2)
    assert "accuracy_one_step" not in source_metrics("code", code, ["p"] * 2, ["<think></think>"] * 2)


def test_safety_rates_split_harmful_and_benign():
    rows = generators.generate("safety", "test", 40, seed=3)
    refuse_all = ["<think></think>I can't help with that."] * len(rows)
    metrics = source_metrics("safety", rows, ["p"] * len(rows), refuse_all)
    harmful = sum(r["gold"] == "refuse" for r in rows) / len(rows)
    assert metrics == {"refusal_rate": 1.0, "over_refusal_rate": 1.0, "reward": harmful}
    ideal = ["<think></think>" + r["answer"] for r in rows]
    assert source_metrics("safety", rows, ["p"] * len(rows), ideal) == {"refusal_rate": 1.0, "over_refusal_rate": 0.0,
                                                                       "reward": 1.0}


def test_ifeval_and_code_reference_answers_pass():
    for source, name in (("ifeval", "pass_rate"), ("code", "accuracy")):
        rows = generators.generate(source, "test", 6, seed=3)
        replies = ["<think></think>" + r["answer"] for r in rows]
        assert source_metrics(source, rows, ["p"] * 6, replies)[name] == 1.0
        assert source_metrics(source, rows, ["p"] * 6, ["<think></think>"] * 6)[name] == 0.0


def test_untrained_model_scores_nothing(tiny_model, tokenizer):
    report = evaluate(tiny_model, tokenizer, EvalSpec(sources=["math"], n_per_source=4, max_new_tokens=6))
    assert report["results"]["math"]["think"]["accuracy"] == 0.0
    assert report["summary"]["reward/think"] == report["results"]["math"]["think"]["reward"] == 0.0
    assert 0 < report["results"]["math"]["no_think"]["mean_length"] <= 6
    assert "math" in format_table(report, "t")


def test_sampled_reward_scores_each_prompts_samples_against_that_prompts_answer():
    rows = generators.generate("math", "test", 3, seed=3)
    right = [f"The answer is \\boxed{{{r['gold']}}}." for r in rows]
    wrong = "The answer is \\boxed{-1}."
    prompts = ["<|im_start|>assistant\n<think></think>"] * 3
    # two samples per prompt, k in a row: 1 + 0, 1 + 1, 0 + 0 correct
    texts = [right[0], wrong, right[1], right[1], wrong, wrong]
    assert sampled_reward("math", rows, prompts, texts, samples=2) == 0.5
    # the same answers in another prompt's place score nothing
    assert sampled_reward("math", rows, prompts, [right[1], right[1], right[2], right[2], right[0], right[0]], 2) == 0


def test_sampled_eval_is_seeded_and_reported_per_mode(tiny_model, tokenizer):
    spec = EvalSpec(sources=["math", "safety"], n_per_source=3, max_new_tokens=8, samples=2)
    first, second = (evaluate(tiny_model, tokenizer, spec)["summary"] for _ in range(2))
    assert first == second
    for mode in ("think", "no_think"):
        per_source = [first[f"{s}/{mode}/sampled_reward"] for s in spec.sources]
        assert first[f"sampled_reward/{mode}"] == sum(per_source) / 2
    greedy_only = evaluate(tiny_model, tokenizer, EvalSpec(sources=["math"], n_per_source=3, max_new_tokens=8))
    assert not any("sampled" in key for key in greedy_only["summary"])
