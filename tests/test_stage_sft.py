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
from typing import Callable

import pytest
import torch
import yaml

from stages.schema import ConfigError
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


def kill_9_when(command: list[str], ready: Callable[[], bool], timeout: float = 300, poll: float = 0.05) -> None:
    """Start a stage and SIGKILL its whole process group as soon as ``ready()`` holds."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + timeout
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(poll)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


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
    assert set(report["results"]["math"]["think"]) >= {"accuracy", "mean_length", "reward"}
    assert report["before"]["stage"] == "base"  # the untrained model, under the same eval settings
    assert report["before"]["summary"]["math/think/accuracy"] == 0.0
    assert set(report["before"]["summary"]) == set(report["summary"])
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
    assert "make pipeline RERUN_FROM=sft_reasoning" in refused.stderr


def test_a_stage_started_with_another_config_is_not_resumed(finished_run, tmp_path):
    from stages.config import load_config
    from stages.runner import StageContext, check_finished

    config = load_config(write_pipeline(tmp_path, str(tmp_path / "run")))
    ctx = StageContext(config, config.stage("sft_reasoning"))
    ctx.dir.mkdir(parents=True)
    ctx.started_marker.write_text(json.dumps({"config_hash": config.stage_hash("sft_reasoning")}))
    assert check_finished(ctx) is False  # same config: resume
    ctx.started_marker.write_text(json.dumps({"config_hash": "0123456789abcdef"}))
    with pytest.raises(ConfigError, match="was started with a different config.*RERUN_FROM=sft_reasoning"):
        check_finished(ctx)


def test_a_changed_stage_makes_every_later_stage_stale(tmp_path):
    from stages.config import load_config

    chat = dict(STAGE, name="sft_chat")
    before = load_config(write_pipeline(tmp_path, "run", [STAGE, chat]))
    changed = dict(STAGE, trainer={**STAGE["trainer"], "learning_rate": 1e-3})
    after = load_config(write_pipeline(tmp_path, "run", [changed, chat]))
    assert before.stage_hash("sft_chat") != after.stage_hash("sft_chat")


def test_launch_starts_nothing_for_a_finished_stage_and_rerun_from_moves_results_aside(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    config = write_pipeline(tmp_path, str(run_dir))
    launched = subprocess.run([sys.executable, "-m", "stages.launch", "sft_reasoning", "--config", str(config)],
                              cwd=ROOT, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert "nothing to do" in launched.stdout and "accelerate" not in launched.stdout

    moved = subprocess.run(stage_command(config, "rerun-from"), cwd=ROOT, capture_output=True, text=True)
    assert moved.returncode == 2 and "needs a stage name" in moved.stderr
    moved = subprocess.run([sys.executable, "-m", "stages", "rerun-from", "sft_reasoning", "--config", str(config)],
                           cwd=ROOT, capture_output=True, text=True)
    assert moved.returncode == 0, moved.stderr[-2000:]
    superseded = list((run_dir / "superseded").glob("*/sft_reasoning"))
    assert len(superseded) == 1 and (superseded[0] / "DONE.json").exists()
    assert not (run_dir / "sft_reasoning").exists() and (run_dir / "base").exists()


def test_manifest_records_the_run(finished_run):
    manifest = json.loads((finished_run / "manifest.json").read_text())
    assert manifest["profile"] == "tiny" and len(manifest["config_hash"]) == 16
    assert manifest["config"]["stages"][0]["trainer"]["max_steps"] == 40
    assert re.fullmatch(r"[0-9a-f]{40}", manifest["git"]["commit"])
    assert manifest["packages"]["torch"] == torch.__version__
    assert manifest["blends"]["sft_reasoning"]["sources"]["math"].startswith("generator sha256:")
    stage = manifest["stages"]["sft_reasoning"]
    assert stage["status"] == "done" and stage["steps"] == 40 and stage["attempts"] == 1
    assert stage["started_at"] <= stage["ended_at"]
    assert stage["checkpoint"] == str(finished_run / "sft_reasoning" / "final")
    assert "math/think/accuracy" in stage["eval"]


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
    marker = run_dir / "sft_reasoning" / "checkpoints" / "checkpoint-10" / "trainer_state.json"
    kill_9_when(stage_command(config), marker.exists)
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
    assert_same_weights(run_dir / "sft_reasoning" / "final", finished_run / "sft_reasoning" / "final")


def test_kill_9_while_a_checkpoint_is_written_resumes_from_the_one_before(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(finished_run / "base", run_dir / "base")
    config = write_pipeline(tmp_path, str(run_dir))
    checkpoints = run_dir / "sft_reasoning" / "checkpoints"
    writing = checkpoints / ".staging" / "checkpoint-20"
    # The weights are written first and the optimizer state after them: kill between the two.
    kill_9_when(stage_command(config), (writing / "model.safetensors").exists, poll=0.001)
    assert writing.exists() and not (checkpoints / "checkpoint-20").exists(), "not killed mid-save"
    assert (checkpoints / "LATEST").read_text().strip() == "checkpoint-10"

    result = run(config)
    assert f"discarding {checkpoints / '.staging'}" in result.stderr
    assert re.search(r"resuming sft_reasoning from \S*checkpoint-10\b", result.stderr)
    assert (checkpoints / "LATEST").read_text().strip() == "checkpoint-40"
    assert_same_weights(run_dir / "sft_reasoning" / "final", finished_run / "sft_reasoning" / "final")


def assert_same_weights(left: Path, right: Path) -> None:
    """Bitwise equal model weights in two HF checkpoints."""
    from safetensors.torch import load_file

    a, b = load_file(left / "model.safetensors"), load_file(right / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


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
    from stages.checkpoints import checkpoint_problem, last_complete_checkpoint

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


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap to mount a small tmpfs")
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(finished_run, tmp_path):
    from stages.checkpoints import checkpoint_problem

    # The run directory is a tmpfs (inside bwrap) with room for the base model, one checkpoint and
    # half of the next: the second save runs out of space.
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    config = write_pipeline(tmp_path, str(run_dir))
    checkpoint = finished_run / "sft_reasoning" / "checkpoints" / "checkpoint-10"
    size = _size(finished_run / "base") + int(1.5 * _size(checkpoint)) + 2**20
    script = (f"cp -r {finished_run / 'base'} {run_dir}/base && {' '.join(stage_command(config))}; "
              f"status=$?; cp -r {run_dir}/sft_reasoning {out}; exit $status")
    command = ["bwrap", "--bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
               "--size", str(size), "--tmpfs", str(run_dir), "sh", "-c", script]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 1, result.stderr[-3000:]
    message = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert message.startswith("error: sft_reasoning: no space left on device at step 20"), message
    assert "checkpoint-10, is intact" in message
    assert checkpoint_problem(out / "checkpoints" / "checkpoint-10") is None
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "checkpoint-10"
    assert not (out / "checkpoints" / "checkpoint-20").exists()
    assert not list((out / "checkpoints" / ".staging").glob("checkpoint-*"))
