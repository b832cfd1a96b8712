"""RPOTrainer on the tiny NemotronH: the logged loss equals a hand computation, and training moves Δπ up."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from data_blends.preference import read_pairs, to_dpo_columns
from model.factory import build_model
from stages.rpo_trainer import RPOConfig, RPOTrainer
from tests.conftest import FIXTURES

BETA, ETA, SFT_WEIGHT = 0.1, 2.0, 0.1
SIDES = ("chosen", "rejected")


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[dict]:
    """Four pairs: the NeMo-Aligner sample in /no_think, and its first pair again in /think."""
    pairs = list(read_pairs("jsonl", FIXTURES / "nemo_aligner_rpo_sample.jsonl", "nemo"))
    return [to_dpo_columns(p, tokenizer, think=False) for p in pairs] + [to_dpo_columns(pairs[0], tokenizer, True)]


def config(tmp_path, **overrides) -> RPOConfig:
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        beta=BETA, reward_scale=ETA, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        activation_checkpointing=False, bf16=False, seed=0,  # TRL turns both on by default
    )
    return RPOConfig(**settings | overrides)


def response_logps(model, tokenizer, prompt: str, response: str) -> tuple[float, int]:
    """Sum of log π(response | prompt) over the response tokens, from a plain forward, and their count."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + response)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    token_logps = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return token_logps[len(prompt_ids) - 1:].sum().item(), len(ids) - len(prompt_ids)


def logps_by_side(model, tokenizer, rows: list[dict]) -> dict[str, list[tuple[float, int]]]:
    return {side: [response_logps(model, tokenizer, row["prompt"], row[side]) for row in rows] for side in SIDES}


@pytest.fixture(scope="module")
def hand_logps(tiny_model, tokenizer, rows) -> dict[str, dict[str, list[tuple[float, int]]]]:
    """Every response under the starting policy (the tiny model) and under a reference of another seed."""
    return {"policy": logps_by_side(tiny_model, tokenizer, rows),
            "ref": logps_by_side(build_model("tiny", tokenizer, seed=1), tokenizer, rows)}


@pytest.mark.parametrize("average", [False, True])
def test_first_logged_loss_equals_hand_computed_rpo_sq(tmp_path, tiny_model, tokenizer, rows, hand_logps, average):
    """Reference log-probs come with the dataset (summed, TRL's convention), so no reference model is loaded."""
    pref, sft, accuracy = [], [], []
    implicit: dict[str, list[float]] = {side: [] for side in SIDES}
    for i, row in enumerate(rows):
        logratio = {}
        for side in SIDES:
            (policy_sum, count), (ref_sum, _) = hand_logps["policy"][side][i], hand_logps["ref"][side][i]
            logratio[side] = (policy_sum - ref_sum) / (count if average else 1)
            implicit[side].append(BETA * logratio[side])
        gap = row["chosen_reward"] - row["rejected_reward"]
        pref.append((BETA * (logratio["chosen"] - logratio["rejected"]) - ETA * gap) ** 2)
        policy_sum, count = hand_logps["policy"]["chosen"][i]
        sft.append(-policy_sum / (count if average else 1))
        accuracy.append(logratio["chosen"] > logratio["rejected"])
    dataset = Dataset.from_list([
        row | {f"ref_{side}_logps": hand_logps["ref"][side][i][0] for side in SIDES}
        for i, row in enumerate(rows)
    ])
    args = config(tmp_path, max_steps=1, preference_loss="rpo_sq", average_log_probs=average,
                  sft_loss_weight=SFT_WEIGHT)
    trainer = RPOTrainer(model=copy.deepcopy(tiny_model), args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    assert trainer.ref_model is None
    trainer.train()
    log, n = trainer.state.log_history[0], len(rows)
    assert log["step"] == 1
    assert log["preference_loss"] == pytest.approx(sum(pref) / n, abs=1e-5)
    assert log["sft_loss"] == pytest.approx(sum(sft) / n, abs=1e-4)
    assert log["loss"] == pytest.approx(sum(pref) / n + SFT_WEIGHT * sum(sft) / n, abs=1e-5)
    assert log["implicit_reward_chosen"] == pytest.approx(sum(implicit["chosen"]) / n, abs=1e-5)
    assert log["implicit_reward_rejected"] == pytest.approx(sum(implicit["rejected"]) / n, abs=1e-5)
    assert log["accuracy"] == sum(accuracy) / n
    assert log["reward_gap"] == pytest.approx((1.0 + 0.7 + 1.0 + 1.0) / n)


def test_training_raises_delta_pi_on_the_training_pairs(tmp_path, tiny_model, tokenizer, rows, hand_logps):
    """The reference is the starting policy, precomputed by TRL before training, so Δπ starts at 0."""
    policy = copy.deepcopy(tiny_model)
    trainer = RPOTrainer(model=policy, args=config(tmp_path, max_steps=5, preference_loss="rpo_bwd_kl"),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset.column_names
    trainer.train()
    start, end = hand_logps["policy"], logps_by_side(policy, tokenizer, rows)
    delta_pi = [(end["chosen"][i][0] - start["chosen"][i][0]) - (end["rejected"][i][0] - start["rejected"][i][0])
                for i in range(len(rows))]
    assert all(d > 0 for d in delta_pi), delta_pi


def test_online_reference_model_gives_the_same_loss_as_precomputed(tmp_path, tiny_model, tokenizer, rows):
    """With a reference model kept in memory, the reference forward runs each step instead of once up front."""
    first_losses = []
    for precompute, ref_model in ((True, None), (False, copy.deepcopy(tiny_model))):
        args = config(tmp_path / str(precompute), max_steps=1, preference_loss="rpo_fwd_kl",
                      precompute_ref_log_probs=precompute)
        trainer = RPOTrainer(model=copy.deepcopy(tiny_model), ref_model=ref_model, args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        assert (trainer.ref_model is None) == precompute
        trainer.train()
        first_losses.append(trainer.state.log_history[0]["loss"])
    assert first_losses[0] == pytest.approx(first_losses[1], abs=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"preference_loss": "simpo"}, "unknown preference loss 'simpo'"),
    ({"loss_type": ["hinge"]}, r"\['loss_type'\] only act on DPOTrainer's own loss"),
    ({"ld_alpha": 0.5}, "ld_alpha"),
    ({"sft_loss_weight": -1.0}, "sft_loss_weight must be >= 0"),
])
def test_config_rejects_settings_it_would_ignore(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, max_steps=1, **overrides)


def test_dataset_without_rewards_is_refused(tmp_path, tiny_model, tokenizer, rows):
    dataset = Dataset.from_list([{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows])
    with pytest.raises(ValueError, match="no column"):
        RPOTrainer(model=copy.deepcopy(tiny_model), args=config(tmp_path, max_steps=1), train_dataset=dataset,
                   processing_class=tokenizer)
