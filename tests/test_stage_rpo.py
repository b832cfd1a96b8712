"""The RPO stage through the real command line: rounds with on-policy and offline pairs, resume in a round."""

from __future__ import annotations

import json
import re
import shutil

import yaml

from stages.rpo import best_and_worst
from tests.conftest import FIXTURES
from tests.test_stage_sft import STAGE, kill_9_when, run, stage_command, write_pipeline

RPO_STAGE = {
    "name": "rpo", "kind": "rpo", "blend": "rpo_blend.yaml",
    "trainer": {"max_steps": 6, "learning_rate": 1e-3, "per_device_train_batch_size": 4, "max_length": 256,
                "logging_steps": 1, "save_steps": 2, "save_total_limit": 5},
    "rpo": {"rounds": 2, "prompts_per_round": 8, "samples_per_prompt": 4, "reward_margin": 0.0,
            "max_new_tokens": 24, "engine_max_batch": 16},
    "eval": {"sources": ["math"], "modes": ["think"], "n_per_source": 4, "max_new_tokens": 8},
}


def test_best_and_worst_needs_a_gap():
    assert best_and_worst([0.2, 1.0, None, 0.0], margin=0.5) == (1, 3)
    assert best_and_worst([0.5, 0.5, 0.5], margin=0.0) is None
    assert best_and_worst([None, 1.0], margin=0.0) is None
    assert best_and_worst([0.0, 0.4], margin=0.5) is None


def write_rpo_pipeline(directory):
    shutil.copy(FIXTURES / "nemo_aligner_rpo_sample.jsonl", directory / "pairs.jsonl")
    (directory / "rpo_blend.yaml").write_text(yaml.safe_dump({"num_examples": 40, "seed": 0, "sources": [
        {"name": "math", "kind": "generator", "reasoning_on": 0.5, "rewards": {"math": 1.0, "format": 0.5}},
        {"name": "nemo", "kind": "jsonl", "path": "pairs.jsonl"}]}))
    sft = {**STAGE, "trainer": {**STAGE["trainer"], "max_steps": 4}}
    return write_pipeline(directory, "run", [sft, RPO_STAGE])


def test_rounds_resume_after_kill_9_and_hand_on_the_last_policy(tmp_path):
    config = write_rpo_pipeline(tmp_path)
    run(config)                                                  # sft_reasoning, the starting point
    rpo = tmp_path / "run" / "rpo"
    marker = rpo / "round_1" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    kill_9_when(stage_command(config, "rpo"), marker.exists, timeout=400)
    assert marker.exists() and not (rpo / "round_1" / "DONE.json").exists(), "not interrupted in round 1"
    round_0 = (rpo / "round_0" / "DONE.json").read_text()
    pairs_1 = (rpo / "round_1" / "pairs.jsonl").read_text()

    result = run(config, "rpo")
    assert re.search(r"resuming rpo/round_1 from \S*checkpoint-[246]", result.stderr)
    assert "resuming rpo/round_0" not in result.stderr
    assert (rpo / "round_0" / "DONE.json").read_text() == round_0       # the finished round was not redone
    assert (rpo / "round_1" / "pairs.jsonl").read_text() == pairs_1      # nor its pairs regenerated
    rows = [json.loads(line) for line in pairs_1.splitlines()]
    assert {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "ref_chosen_logps",
            "ref_rejected_logps"} <= set(rows[0])
    assert any("42" in r["chosen"] for r in rows)                        # the offline pairs are mixed in
    done = json.loads((rpo / "DONE.json").read_text())
    assert [r["round"] for r in done["train_metrics"]["rounds"]] == [0, 1] and done["steps"] == 12
    final, last = rpo / "final" / "model.safetensors", rpo / "round_1" / "final" / "model.safetensors"
    assert final.read_bytes() == last.read_bytes()
