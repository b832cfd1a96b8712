"""The rollout engine from a policy sharded across processes: built from it, and refreshed from it after an
optimizer step, under FSDP2 and DeepSpeed ZeRO-3, as GRPO runs it with those accelerate configs.

Two CPU processes (gloo) run ``tests/sharded_engine_worker.py`` under torchrun. Each compares its engine
with one built from the whole model: the same greedy tokens and log-probabilities before the step, and
after it, against the whole model given the gathered updated weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_multinode import free_port
from tests.test_stage_grpo import GRPO_STAGE, write_pipeline

ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("mode", ["fsdp2", "zero3"])
def test_engine_follows_a_sharded_policy(tokenizer, tmp_path, mode):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(ROOT / "tests" / "sharded_engine_worker.py"),
               mode, str(tmp_path / "tokenizer"), str(tmp_path)]
    # The first ZeRO-3 run on a machine builds DeepSpeed's CPU communication op (about 30 s).
    run = subprocess.run(command, cwd=ROOT, env=os.environ | ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["sharded"]                     # every parameter of the policy was split across the two
        assert result["before"] == result["reference_before"]
        assert result["weights_moved"] > 1e-3
        assert result["engine_equals_gathered"]      # load_weights copied every gathered parameter
        assert result["after"] == result["reference_after"]
        assert [o["tokens"] for o in result["after"]] != [o["tokens"] for o in result["before"]]
    assert ranks[0] == ranks[1]


def test_grpo_stage_under_zero3(tmp_path):
    """The GRPO stage as ``make grpo ACCELERATE_CONFIG=configs/accelerate/zero3.yaml`` starts it, on two CPU
    processes: it trains, the engine's log-probabilities follow the sharded policy at every step (the
    engine is built from it and refreshed from it after each update), and the main process evaluates the
    saved checkpoint alone."""
    accelerate = yaml.safe_load((ROOT / "configs" / "accelerate" / "zero3.yaml").read_text())
    accelerate.update(num_processes=2, use_cpu=True, mixed_precision="no")
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(accelerate))
    stage = {**GRPO_STAGE, "trainer": {**GRPO_STAGE["trainer"], "max_steps": 3, "learning_rate": 2e-2,
                                                   "max_length": 256},
             "grpo": {**GRPO_STAGE["grpo"], "importance_sampling": True},
             "eval": {"sources": ["math"], "modes": ["think"], "n_per_source": 2, "max_new_tokens": 8}}
    config = write_pipeline(tmp_path, str(tmp_path / "run"), stage)
    command = [sys.executable, "-m", "stages.launch", "grpo", "--config", str(config),
               "--accelerate-config", str(tmp_path / "zero3.yaml"), "--main-process-port", str(free_port())]
    run = subprocess.run(command, cwd=ROOT, env=os.environ | ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    differences = [s["sampling/sampling_logp_difference/max"] for s in steps if "sampling/sampling_logp_difference/max" in s]
    assert len(differences) == 3 and max(differences) < 1e-4
    assert json.loads((tmp_path / "run" / "grpo" / "eval.json").read_text())["summary"]
