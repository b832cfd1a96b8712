"""The GRPO stage's pieces on a real tiny model: rollout contract, weight sync, dynamic sampling, masking, IS."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
import torch
import yaml
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionCacheLayerMixin
from trl import GRPOTrainer

from model.factory import build_model
from stages.config import load_config
from stages.grpo import (GRPOStageTrainer, SourceReward, build_trainer, cache_rows, distinct_prompts,
                         fewest_cells_split, importance_ratio, informative_rows, length_groups, merge_batches,
                         resample_groups, ungroup)
from stages.runner import StageContext

GRPO_STAGE = {
    "name": "grpo", "kind": "grpo", "blend": "blend.yaml",
    "trainer": {"max_steps": 1, "learning_rate": 5e-3, "per_device_train_batch_size": 8, "max_length": 128,
                "logging_steps": 1, "save_steps": 100},
    "grpo": {"num_generations": 4, "max_new_tokens": 12, "engine_max_batch": 8},
}


def write_pipeline(directory, run_dir, stage):
    """A pipeline of one GRPO stage on math and code prompts, from the tiny layout."""
    blend = {"num_examples": 40, "seed": 0, "sources": [
        {"name": "math", "kind": "generator", "reasoning_on": 0.5, "rewards": {"math": 1.0}},
        {"name": "code", "kind": "generator", "reasoning_on": 0.5, "rewards": {"format": 1.0}}]}
    (directory / "blend.yaml").write_text(yaml.safe_dump(blend))
    doc = {"run_dir": run_dir, "model": {"name": "tiny"}, "stages": [stage], "profiles": {"tiny": {}}}
    (directory / "pipeline.yaml").write_text(yaml.safe_dump(doc))
    return directory / "pipeline.yaml"


def make_trainer(tmp_path, tokenizer, model, **grpo):
    config = load_config(write_pipeline(tmp_path, "run", {**GRPO_STAGE, "grpo": {**GRPO_STAGE["grpo"], **grpo}}))
    trainer = build_trainer(StageContext(config, config.stages[0]), model, tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by train(); some tests call the loss directly
    return trainer


def use_reward(trainer, reward):
    """Score every completion with ``reward`` alone."""
    trainer.reward_funcs, trainer.reward_func_names = [reward], [reward.__name__]
    trainer.reward_processing_classes, trainer.reward_weights = [None], torch.ones(1)


def policy_logprobs(model, prompt_ids, completion_ids):
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion_ids])).logits.float()
    return torch.log_softmax(logits, -1)[0, len(prompt_ids) - 1 : -1].gather(
        1, torch.tensor(completion_ids)[:, None])[:, 0]


def test_rollout_func_contract_and_weight_sync(tmp_path, tokenizer):
    model = build_model("tiny", tokenizer, seed=0)
    trainer = make_trainer(tmp_path, tokenizer, model)
    prompts = [trainer.train_dataset[i]["prompt"] for i in range(3) for _ in range(2)]
    out = trainer.rollout_func(prompts, trainer)
    assert set(out) == {"prompt_ids", "completion_ids", "logprobs"}
    assert len(out["completion_ids"]) == len(prompts) and all(len(c) <= 12 for c in out["completion_ids"])
    assert out["prompt_ids"][0] == tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True,
                                                                 tokenize=True, return_dict=False)
    for p, c, lp in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"]):
        torch.testing.assert_close(torch.tensor(lp), policy_logprobs(model, p, c), atol=1e-4, rtol=0)
    logged = {name: values[-1] for name, values in trainer._pending_metrics.items()}
    assert 0 < logged["time/generation_prefill_s"] < logged["time/generation_s"]
    decoded = sum(map(len, out["completion_ids"])) - len(prompts)
    assert decoded == 0 or logged["rollout/decode_tokens_per_s"] > decoded / logged["time/generation_s"]

    trainer.train()                                              # one optimizer step changes the policy
    trainer.vllm_generation.sync_weights()
    out = trainer.rollout_func(prompts, trainer)
    for p, c, lp in zip(out["prompt_ids"], out["completion_ids"], out["logprobs"]):
        torch.testing.assert_close(torch.tensor(lp), policy_logprobs(trainer.model, p, c), atol=1e-4, rtol=0)


@pytest.mark.parametrize("mask_truncated", [True, False])
def test_scored_batch_masks_truncation_and_corrects_sampling(tmp_path, tokenizer, mask_truncated):
    trainer = make_trainer(tmp_path, tokenizer, build_model("tiny", tokenizer, seed=0), dynamic_sampling=False,
                           mask_truncated_completions=mask_truncated, importance_sampling_cap=2.0)
    inputs = [dict(trainer.train_dataset[i]) for i in range(2) for _ in range(4)]
    trainer.model.train()
    out = trainer._generate_and_score_completions(inputs)
    truncated = out["completion_ids"][:, -1] != tokenizer.pad_token_id
    assert truncated.any()                                       # an untrained model rarely stops in 12 tokens
    assert (out["completion_mask"][truncated] == 0).all() == mask_truncated
    assert "old_per_token_logps" not in out                      # no extra forward pass: weighed in the loss
    mask = out["completion_mask"]
    trainer._compute_loss(trainer.model, out)
    policy = torch.nn.utils.rnn.pad_sequence(
        [policy_logprobs(trainer.model, p[m.bool()].tolist(), c.tolist()) for p, m, c in
         zip(out["prompt_ids"], out["prompt_mask"], out["completion_ids"])], batch_first=True)
    gap = (policy - out["sampling_per_token_logps"]) * mask
    torch.testing.assert_close(out["importance_sampling_ratio"], torch.exp(gap).clamp(max=2.0))
    if not mask_truncated:   # same fp32 math on CPU: engine and trainer log-probabilities agree closely
        assert mask.sum() > 0 and gap.abs().max() < 1e-4


def test_deferred_importance_weights_give_trls_loss_and_gradient(tmp_path, tokenizer):
    """Weighing in the loss's own forward pass gives what TRL gets from its extra no-grad pass."""
    trainer = make_trainer(tmp_path, tokenizer, build_model("tiny", tokenizer, seed=0), dynamic_sampling=False,
                           mask_truncated_completions=False, importance_sampling_cap=1.5)
    engine_rollout = trainer.rollout_func

    def shifted_rollout(prompts, trainer_):  # an engine whose log-probabilities are off by up to 1 nat
        out, noise = engine_rollout(prompts, trainer_), torch.Generator().manual_seed(0)
        out["logprobs"] = [(torch.tensor(lp) - torch.rand(len(lp), generator=noise)).tolist() for lp in out["logprobs"]]
        return out

    trainer.rollout_func = shifted_rollout
    inputs = [dict(trainer.train_dataset[i]) for i in range(2) for _ in range(4)]
    trainer.model.train()
    batches, grads = [], []
    for defer in (True, False):
        trainer._defers_importance_sampling = lambda defer=defer: defer
        trainer.vllm_generation.calls = (-1, 0)                  # the same rollout seed: the same completions
        out = trainer._generate_and_score_completions(inputs)
        assert ("old_per_token_logps" in out) != defer and ("importance_sampling_ratio" in out) != defer
        trainer.model.zero_grad()
        trainer._compute_loss(trainer.model, out).backward()
        batches.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    deferred, trl = batches
    assert torch.equal(deferred["completion_ids"], trl["completion_ids"])
    ratio = deferred["importance_sampling_ratio"][deferred["completion_mask"].bool()]
    assert (ratio == 1.5).any() and (ratio < 1.5).any()         # the cap is reached, and not everywhere
    torch.testing.assert_close(deferred["importance_sampling_ratio"], trl["importance_sampling_ratio"])
    torch.testing.assert_close(grads[0], grads[1])


def test_length_groups_cut_each_group_to_the_columns_its_rows_use():
    # Prompt width 3 (left-padded), completion width 4 (right-padded); the last row's completion is masked.
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1],
                         [0, 0, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 1, 1, 0],
                         [0, 0, 1, 0, 0, 0, 0]])
    groups = length_groups(mask, completion_width=4, groups=2)
    assert [(rows.tolist(), cols, keep) for rows, cols, keep in groups] == [
        ([1, 3], slice(2, 4), 1),                                # shortest rows: one completion column kept
        ([0, 2], slice(0, 7), 4)]
    parts = [10 * rows[:, None] + torch.arange(keep) for rows, _, keep in groups]
    assert ungroup(parts, groups, width=4).tolist() == [[0, 1, 2, 3], [10, 0, 0, 0], [20, 21, 22, 23], [30, 0, 0, 0]]


def test_length_groups_leave_a_long_tail_to_itself():
    # Seven replies of 2 tokens and one of 10 after prompts of 3: two equal halves would pad three short
    # rows to the long one; the fewest cells put the long row alone.
    mask = torch.zeros(8, 13, dtype=torch.long)
    mask[:, :5] = 1
    mask[7, :13] = 1
    groups = length_groups(mask, completion_width=10, groups=2)
    assert [rows.tolist() for rows, _, _ in groups] == [[0, 1, 2, 3, 4, 5, 6], [7]]
    assert [keep for _, _, keep in groups] == [2, 10]


def test_fewest_cells_split_is_the_best_of_every_split():
    def cells(first, last, bounds):
        return sum((end - begin) * (max(last[begin:end]) - min(first[begin:end]) + 1)
                   for begin, end in zip(bounds[:-1], bounds[1:]))

    rng = random.Random(0)
    for _ in range(200):
        n, groups = rng.randint(1, 8), rng.randint(1, 4)
        first = [rng.randint(0, 5) for _ in range(n)]
        last = [f + rng.randint(0, 12) for f in first]
        got = fewest_cells_split(torch.tensor(first), torch.tensor(last), groups)
        assert got[0] == 0 and got[-1] == n and len(got) <= groups + 1 and got == sorted(set(got))
        every = [[0, *cut, n] for k in range(groups) for cut in itertools.combinations(range(1, n), k)]
        assert cells(first, last, got) == min(cells(first, last, bounds) for bounds in every)


@pytest.mark.parametrize("share_prompts, checkpointing", [(True, False), (False, False), (True, True)])
def test_grouped_forward_gives_the_loss_and_gradient_of_trls_padded_forward(tmp_path, tokenizer, share_prompts,
                                                                            checkpointing):
    trainer = make_trainer(tmp_path, tokenizer, build_model("tiny", tokenizer, seed=0), dynamic_sampling=False,
                           mask_truncated_completions=False, importance_sampling=False, length_groups=3,
                           share_prompts=share_prompts)
    if checkpointing:  # transformers drops the cache of a checkpointed layer: prompts are not shared then
        trainer.model.gradient_checkpointing_enable()
    engine_rollout = trainer.rollout_func

    def uneven_rollout(prompts, trainer_):  # completions of 1 to 12 tokens, as a trained model stops
        out = engine_rollout(prompts, trainer_)
        for key in ("completion_ids", "logprobs"):
            out[key] = [row[: 1 + 5 * i % 12] for i, row in enumerate(out[key])]
        return out

    def length_parity(prompts, completions, completion_ids, **kw):
        return [float(len(c) % 2) for c in completion_ids]

    trainer.rollout_func = uneven_rollout
    use_reward(trainer, length_parity)
    inputs = [dict(trainer.train_dataset[i]) for i in range(2) for _ in range(4)]
    trainer.model.train()
    out = trainer._generate_and_score_completions(inputs)
    assert len(set(out["prompt_mask"].sum(1).tolist())) > 1 and len(set(out["completion_mask"].sum(1).tolist())) > 4
    assert out["advantages"].abs().min() > 0
    losses, grads = [], []
    for forward in (trainer._get_per_token_logps_and_entropies,
                    functools.partial(GRPOTrainer._get_per_token_logps_and_entropies, trainer)):
        trainer._get_per_token_logps_and_entropies = forward
        trainer.model.zero_grad()
        losses.append(trainer._compute_loss(trainer.model, dict(out)))
        losses[-1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    # Shared: each of the 2 prompts ran once up to its last token, which starts each row's continuation.
    shared = share_prompts and not checkpointing
    assert trainer.shared_prompt_tokens == (int(out["prompt_mask"][::4].sum()) - 2 if shared else 0)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    # TRL's no-grad passes (reference, old policy) come in micro-batches of batch_size rows.
    ids, mask = (torch.cat([out[f"prompt_{k}"], out[f"completion_{k}"]], 1) for k in ("ids", "mask"))
    width = out["completion_ids"].shape[1]
    with torch.no_grad():
        chunked, _, _ = GRPOStageTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, width,
                                                                            batch_size=3)
        whole, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, width)
    completion = out["completion_mask"].bool()
    torch.testing.assert_close(chunked[completion], whole[completion], atol=1e-5, rtol=1e-5)


def test_distinct_prompts_tell_padding_from_a_token_of_the_same_id():
    ids = torch.tensor([[0, 0, 5], [0, 0, 5], [7, 3, 5], [0, 0, 5], [7, 3, 5]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]])
    first, owner = distinct_prompts(ids, mask)
    assert sorted(first.tolist()) == [0, 1, 2]
    assert torch.equal(first[owner], torch.tensor([0, 1, 2, 0, 2]))


def test_rows_of_a_shared_cache_backpropagate_the_same_bits_every_time(tokenizer):
    """64 rows continue from 2 prompts' cached states (Mamba conv and SSM states, attention keys and values):
    on two CPU threads the gradient that flows back through the repeated rows must not depend on the order
    in which threads add it, or two runs of a stage drift apart."""
    model = build_model("tiny", tokenizer, seed=0)
    prompts = torch.tensor([tokenizer.encode("What is 12 plus 30?")[:6], tokenizer.encode("Name a prime")[:6]])
    owner = torch.arange(2).repeat(32)
    weights: dict[tuple[int, str], torch.Tensor] = {}

    def gradient() -> torch.Tensor:
        model.zero_grad()
        cache = DynamicCache(config=model.config)
        model(input_ids=prompts, cache=cache, use_cache=True)
        rows = cache_rows(cache, owner, model.config)
        total = 0
        for i, layer in enumerate(rows.layers):
            states = ((rows.get_conv_state(i), rows.get_recurrent_state(i))
                      if isinstance(layer, LinearAttentionCacheLayerMixin) else (layer.keys, layer.values))
            for k, state in enumerate(s for s in states if s is not None):     # the MLP layer holds none
                w = weights.setdefault((i, k), torch.randn(state.shape, generator=torch.Generator().manual_seed(i)))
                total = total + (state * w).sum()
        total.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    assert torch.get_num_threads() > 1
    first = gradient()
    assert len(weights) == 2 * sum(kind != "mlp" for kind in model.config.layers_block_type)   # every state
    assert all(torch.equal(first, gradient()) for _ in range(5))


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_importance_ratio_modes(mode):
    trainer_logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    sampling = torch.tensor([[-1.5, -1.0, float("nan")], [-1.2, -1.1, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    ratio = importance_ratio(trainer_logps, sampling, mask, mode, cap=1.2)
    gap = torch.tensor([[0.5, -1.0, 0.0], [0.2, 0.1, 0.0]])     # NaN and masked tokens: no correction
    if mode.startswith("sequence"):
        gap = gap.sum(-1, keepdim=True)
    expected = gap.exp().clamp(max=1.2) if mode.endswith("truncate") else gap.exp() * (gap.exp() <= 1.2)
    torch.testing.assert_close(ratio, expected)


def test_dynamic_sampling_fills_the_batch_with_informative_groups(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, build_model("tiny", tokenizer, seed=0), max_resample_rounds=6)
    # The untrained model never solves math (all-zero groups); code rows are scored by a reward that varies.
    odd = lambda prompts, completions, completion_ids, source, **kw: [  # noqa: E731
        float(c[0] % 2) if s == "code" else (0.0 if s == "math" else None)
        for c, s in zip(completion_ids, source)]
    odd.__name__ = "first_token_parity"
    use_reward(trainer, odd)
    math_rows = [dict(r) for r in trainer.train_dataset if r["source"] == "math"][:2]
    inputs = [r for r in math_rows for _ in range(4)]
    trainer.model.train()
    out = trainer._generate_and_score_completions(inputs)
    assert out["advantages"].shape == (8,) and informative_rows(out["advantages"], 4).all()
    assert trainer._metrics["train"]["dynamic_sampling/zero_variance_share"][-1] == 1.0
    assert out["num_items_in_batch"] == out["completion_mask"].sum()

    # One math group among three code groups: the fresh draws replace what was dropped, not the batch.
    code_rows = [dict(r) for r in trainer.train_dataset if r["source"] == "code"][:3]
    sizes: list[int] = []
    rollout = trainer.rollout_func
    trainer.rollout_func = lambda prompts, trainer: sizes.append(len(prompts)) or rollout(prompts, trainer)
    out = trainer._generate_and_score_completions([r for r in math_rows[:1] + code_rows for _ in range(4)])
    assert out["advantages"].shape == (16,) and informative_rows(out["advantages"], 4).all()
    dropped = round(trainer._metrics["train"]["dynamic_sampling/zero_variance_share"][-1] * 4)
    assert dropped >= 1 and sizes[:2] == [16, 4 * resample_groups(dropped, 4)]


def test_resampling_draws_twice_the_dropped_groups_up_to_a_batch():
    assert [resample_groups(missing, 16) for missing in (1, 3, 8, 16)] == [2, 6, 16, 16]


def test_merge_batches_pads_each_side():
    a = {"prompt_ids": torch.tensor([[5, 6], [7, 8]]), "completion_ids": torch.tensor([[1], [2]]),
         "advantages": torch.tensor([0.0, 1.0]), "num_items_in_batch": torch.tensor(2)}
    b = {"prompt_ids": torch.tensor([[9, 9, 9]]), "completion_ids": torch.tensor([[3, 4]]),
         "advantages": torch.tensor([2.0]), "num_items_in_batch": torch.tensor(2)}
    merged = merge_batches([a, b], [torch.tensor([False, True]), torch.tensor([True])], size=2)
    assert merged["prompt_ids"].tolist() == [[0, 7, 8], [9, 9, 9]]
    assert merged["completion_ids"].tolist() == [[2, 0], [3, 4]]
    assert merged["advantages"].tolist() == [1.0, 2.0] and "num_items_in_batch" not in merged


def test_source_reward_sees_the_whole_reply(tokenizer):
    reward = SourceReward("math", {"math": 1.0, "format": 0.5}, tokenizer)
    prompt = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "What is 2+3?"}]
    right = tokenizer.encode("The answer is \\boxed{5}", add_special_tokens=False) + [tokenizer.eos_token_id]
    wrong = tokenizer.encode("\\boxed{6}", add_special_tokens=False)
    scores = reward(prompts=[prompt] * 3, completions=["", "", ""], completion_ids=[right, wrong, right],
                    source=["math", "math", "code"], gold=["5", "5", ""])
    assert scores == [1.5, 0.5, None]                            # format sees the prompt's <think></think>


def test_source_reward_logs_each_reasoning_mode_apart(tokenizer):
    reward = SourceReward("math", {"math": 1.0}, tokenizer)
    think = [{"role": "system", "content": "/think"}, {"role": "user", "content": "What is 2+3?"}]
    direct = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "What is 2+3?"}]
    reply = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    replies = [reply("2+3=5</think>\\boxed{5}"), reply("2+3=6</think>\\boxed{6}"), reply("\\boxed{5}"), reply("\\boxed{5}")]
    logged: dict[str, float] = {}
    reward(prompts=[think, think, direct, direct], completions=[""] * 4, completion_ids=replies,
           source=["math"] * 4, gold=["5"] * 4, log_metric=logged.__setitem__)
    assert logged["rewards_by_mode/math/think"] == 0.5 and logged["rewards_by_mode/math/no_think"] == 1.0
