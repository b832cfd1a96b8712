"""The SFT stage end to end through the real command line: train, final checkpoint, skip, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

STAGE = {
    "name": "sft_reasoning", "kind": "sft", "blend": "blend.yaml",
    "trainer": {"max_steps": 40, "learning_rate": 3e-3, "per_device_train_batch_size": 8, "max_length": 160,
                "logging_steps": 2, "save_steps": 10, "save_total_limit": 5},
    "eval": {"sources": ["math"], "modes": ["think"], "n_per_source": 4, "max_new_tokens": 8},
}


def write_pipeline(directory: Path, run_dir: str, stages: list[dict] | None = None) -> Path:
    (directory / "blend.yaml").write_text(yaml.safe_dump(
        {"num_examples": 400, "seed": 0, "sources": [{"name": "math", "kind": "generator", "reasoning_on": 0.5}]}))
    doc = {"run_dir": run_dir, "seed": 0, "model": {"name": "tiny", "tokenizer_vocab_size": 320},
           "stages": stages or [STAGE], "profiles": {"tiny": {}}}
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def stage_command(config: Path, stage: str = "sft_reasoning") -> list[str]:
    return [sys.executable, "-m", "stages", stage, "--config", str(config)]


def run(config: Path, stage: str = "sft_reasoning") -> subprocess.CompletedProcess:
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(stage_command(config, stage), cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "sft_reasoning" / "metrics.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines) if "loss" in entry}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One uninterrupted run, shared by the tests below."""
    directory = tmp_path_factory.mktemp("full")
    run(write_pipeline(directory, "run"))
    return directory / "run"


def test_stage_writes_a_plain_transformers_checkpoint_and_eval(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = finished_run / "sft_reasoning" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert type(model).__name__ == "NemotronHForCausalLM"
    assert tokenizer.chat_template and "<think>" in tokenizer.get_vocab()
    done = json.loads((finished_run / "sft_reasoning" / "DONE.json").read_text())
    assert done["steps"] == 40
    report = json.loads((finished_run / "sft_reasoning" / "eval.json").read_text())
    assert set(report["results"]["math"]["think"]) >= {"accuracy", "mean_length"}
    steps = sorted(losses(finished_run))
    assert steps == list(range(2, 41, 2))
    assert losses(finished_run)[40] < losses(finished_run)[2]  # it learned something


def test_finished_stage_is_skipped_and_a_changed_config_is_refused(finished_run, tmp_path):
    config = write_pipeline(tmp_path, str(finished_run))
    before = (finished_run / "sft_reasoning" / "DONE.json").read_text()
    result = run(config)
    assert "already finished" in result.stderr
    assert (finished_run / "sft_reasoning" / "DONE.json").read_text() == before
    changed = dict(STAGE, trainer={**STAGE["trainer"], "learning_rate": 1e-3})
    config = write_pipeline(tmp_path, str(finished_run), [changed])
    refused = subprocess.run(stage_command(config), cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "finished with a different config" in refused.stderr


def test_next_stage_refuses_to_start_before_its_predecessor(tmp_path):
    chat = dict(STAGE, name="sft_chat")
    config = write_pipeline(tmp_path, "run", [STAGE, chat])
    result = subprocess.run(stage_command(config, "sft_chat"), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "make sft-reasoning" in result.stderr


def test_kill_9_then_rerun_resumes_with_the_same_losses(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(finished_run / "base", run_dir / "base")  # same tokenizer and initial weights
    config = write_pipeline(tmp_path, str(run_dir))
    process = subprocess.Popen(stage_command(config), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    marker = run_dir / "sft_reasoning" / "checkpoints" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(losses(run_dir))
    assert 10 <= killed_at < 40, "the run was not interrupted mid-stage"
    assert not (run_dir / "sft_reasoning" / "DONE.json").exists()

    logged_before = len((run_dir / "sft_reasoning" / "metrics.jsonl").read_text().splitlines())
    result = run(config)
    resumed_from = int(re.search(r"resuming sft_reasoning from \S*checkpoint-(\d+)", result.stderr).group(1))
    assert resumed_from >= 10
    lines = (run_dir / "sft_reasoning" / "metrics.jsonl").read_text().splitlines()[logged_before:]
    after = {e["step"]: e["loss"] for e in map(json.loads, lines) if "loss" in e}
    assert min(after) == resumed_from + 2  # finished steps were not trained again
    reference = losses(finished_run)
    assert sorted(after) == list(range(resumed_from + 2, 41, 2))
    for step, loss in after.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), step


def test_sigterm_saves_a_checkpoint_exits_0_and_the_rerun_continues(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(finished_run / "base", run_dir / "base")
    config = write_pipeline(tmp_path, str(run_dir))
    process = subprocess.Popen(stage_command(config), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    metrics = run_dir / "sft_reasoning" / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or not metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    stopped = int(re.search(r"stopped at step (\d+) on SIGTERM", stderr).group(1))
    assert 2 <= stopped < 40 and (run_dir / "sft_reasoning" / "checkpoints" / f"checkpoint-{stopped}").exists()
    assert not (run_dir / "sft_reasoning" / "DONE.json").exists()
    result = run(config)
    assert f"checkpoint-{stopped}" in re.search(r"resuming sft_reasoning from \S+", result.stderr).group(0)
    assert json.loads((run_dir / "sft_reasoning" / "DONE.json").read_text())["steps"] == 40


def test_an_incomplete_checkpoint_is_passed_over(finished_run, tmp_path):
    from stages.runner import checkpoint_problem, last_complete_checkpoint

    source = finished_run / "sft_reasoning" / "checkpoints"
    complete = sorted(source.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for path in complete[-2:]:
        shutil.copytree(path, tmp_path / path.name)
    older, newer = (tmp_path / p.name for p in complete[-2:])
    assert last_complete_checkpoint(tmp_path) == newer
    weights = newer / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])                     # a save cut short by a crash
    assert checkpoint_problem(newer) == "model.safetensors is truncated"
    assert last_complete_checkpoint(tmp_path) == older
    (older / "trainer_state.json").write_text('{"global_st')
    assert checkpoint_problem(older) == "trainer_state.json is missing or truncated"
    assert last_complete_checkpoint(tmp_path) is None
