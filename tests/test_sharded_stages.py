"""Training with the policy sharded across processes, on two CPU processes (gloo).

The rollout engine from a policy under FSDP2 and DeepSpeed ZeRO-3: ``tests/sharded_engine_worker.py``
under torchrun compares each process's engine with one built from the whole model, the same greedy
tokens and log-probabilities before an optimizer step and after it. Then the GRPO and RPO stages as
``make <stage> ACCELERATE_CONFIG=configs/accelerate/zero3.yaml`` starts them, switched to CPU."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.rpo_trainer import REF_COLUMNS
from tests.conftest import ROOT
from tests.test_multinode import free_port
from tests.test_stage_grpo import GRPO_STAGE, write_pipeline
from tests.test_stage_rpo import RPO_STAGE, write_rpo_pipeline
from tests.test_stage_sft import run

ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}


def worker(mode: str, tokenizer, directory: Path) -> subprocess.CompletedProcess:
    """``tests/sharded_engine_worker.py`` on two processes under torchrun; each writes ``rank<r>.json``."""
    tokenizer.save_pretrained(directory / "tokenizer")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(ROOT / "tests" / "sharded_engine_worker.py"),
               mode, str(directory / "tokenizer"), str(directory)]
    # The first ZeRO-3 run on a machine builds DeepSpeed's CPU communication op (about 30 s).
    return subprocess.run(command, cwd=ROOT, env=os.environ | ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["fsdp2", "zero3"])
def test_engine_follows_a_sharded_policy(tokenizer, tmp_path, mode):
    run = worker(mode, tokenizer, tmp_path)
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


def test_engine_refuses_fsdp1(tokenizer, tmp_path):
    """FSDP version 1 shards flat parameters the engine cannot gather: refused, saying what to use."""
    run = worker("fsdp1", tokenizer, tmp_path)
    assert run.returncode != 0 and "use fsdp_version: 2" in run.stderr


def zero3_launch(directory: Path, config: Path, stage: str) -> subprocess.CompletedProcess:
    """``python -m stages.launch <stage>`` under the shipped ZeRO-3 config, on two CPU processes."""
    accelerate = yaml.safe_load((ROOT / "configs" / "accelerate" / "zero3.yaml").read_text())
    accelerate.update(num_processes=2, use_cpu=True, mixed_precision="no")
    (directory / "zero3.yaml").write_text(yaml.safe_dump(accelerate))
    command = [sys.executable, "-m", "stages.launch", stage, "--config", str(config),
               "--accelerate-config", str(directory / "zero3.yaml"), "--main-process-port", str(free_port())]
    run = subprocess.run(command, cwd=ROOT, env=os.environ | ENV, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_grpo_stage_under_zero3(tmp_path):
    """The GRPO stage as ``make grpo ACCELERATE_CONFIG=configs/accelerate/zero3.yaml`` starts it, on two CPU
    processes: it trains, the engine's log-probabilities follow the sharded policy at every step (the
    engine is built from it and refreshed from it after each update), and the main process evaluates the
    saved checkpoint alone."""
    stage = {**GRPO_STAGE, "trainer": {**GRPO_STAGE["trainer"], "max_steps": 3, "learning_rate": 2e-2,
                                                   "max_length": 256},
             "grpo": {**GRPO_STAGE["grpo"], "importance_sampling": True},
             "eval": {"sources": ["math"], "modes": ["think"], "n_per_source": 2, "max_new_tokens": 8}}
    zero3_launch(tmp_path, write_pipeline(tmp_path, str(tmp_path / "run"), stage), "grpo")
    steps = [json.loads(line) for line in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    differences = [s["sampling/sampling_logp_difference/max"] for s in steps if "sampling/sampling_logp_difference/max" in s]
    assert len(differences) == 3 and max(differences) < 1e-4
    assert json.loads((tmp_path / "run" / "grpo" / "eval.json").read_text())["summary"]


def test_rpo_stage_under_zero3(tmp_path):
    """Both rounds: the processes sample the pairs together (the first round's are those of one process
    sampling them all), every process takes part in TRL's reference pass over them, and the rounds train
    and hand on their policy; then the evaluation."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    config_one, config_two = write_rpo_pipeline(one), write_rpo_pipeline(two)
    run(config_one)                                          # sft_reasoning, one process
    shutil.copytree(one / "run", two / "run")
    run(config_one, "rpo")                                   # rpo on one process, then on two under ZeRO-3
    zero3_launch(two, config_two, "rpo")
    first = [(d / "run" / "rpo" / "round_0" / "candidates.jsonl").read_text() for d in (one, two)]
    assert first[0] == first[1]
    rpo = two / "run" / "rpo"
    for index in range(RPO_STAGE["rpo"]["rounds"]):
        done = json.loads((rpo / f"round_{index}" / "DONE.json").read_text())
        assert done["pairs"] > 0 and done["steps"] == RPO_STAGE["trainer"]["max_steps"]
        rows = [json.loads(line) for line in (rpo / f"round_{index}" / "pairs.jsonl").read_text().splitlines()]
        assert len(rows) == done["pairs"]
        assert all(math.isfinite(row[column]) and row[column] < 0 for row in rows for column in REF_COLUMNS)
    assert json.loads((rpo / "eval.json").read_text())["summary"]
