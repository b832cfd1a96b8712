"""Two machines on one computer: an SFT stage launched as 2 nodes x 1 CPU process (gloo), each through
``python -m stages.launch`` as the Makefile runs it, trains exactly like one process with the same global
batch: the same loss at every step and the same final weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.test_stage_sft import STAGE, losses, stage_command, write_pipeline

STEPS = 6
GLOBAL_BATCH = 8
MULTI_CPU = ROOT / "configs" / "accelerate" / "multi_cpu.yaml"
TIMEOUT = 240  # seconds for each run; the whole test takes about a minute on 2 busy cores
# CPU only, one thread per process (both "machines" share this computer's cores; more threads only
# oversubscribe them), the same in both runs.
ENV = {"TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def stage(per_device_batch: int) -> dict:
    return dict(STAGE,
                trainer={**STAGE["trainer"], "max_steps": STEPS, "per_device_train_batch_size": per_device_batch,
                         "logging_steps": 1, "save_steps": 100},
                eval={**STAGE["eval"], "n_per_source": 1})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # a file, not a pipe: a pipe nobody reads fills up and blocks the run
        return subprocess.Popen(command, cwd=ROOT, env=os.environ | ENV, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_tree(process: subprocess.Popen) -> None:
    """Kill a launch and everything under it: torchrun starts each worker in a session of its own, so the
    launch's process group alone would leave the workers running."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


def finish(processes: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for all processes; if one fails or time runs out, kill them all (the other rank would wait for
    its peer until the timeout) and show the logs."""
    deadline = time.time() + TIMEOUT
    try:
        while time.time() < deadline and any(p.poll() is None for p in processes):
            if any(p.poll() not in (None, 0) for p in processes):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                kill_tree(process)
    failed = [f"process {i} exited {p.returncode}:\n{log.read_text()[-3000:]}"
              for i, (p, log) in enumerate(zip(processes, logs)) if p.returncode != 0]
    assert not failed, "\n\n".join(failed)


def test_two_machines_train_like_one_process_with_the_same_global_batch(tmp_path):
    single, pair = tmp_path / "single", tmp_path / "pair"
    for directory in (single, pair / "run"):
        directory.mkdir(parents=True)
    config = write_pipeline(single, str(single / "run"), [stage(GLOBAL_BATCH)])
    finish([start(stage_command(config), single / "log.txt")], [single / "log.txt"])

    shutil.copytree(single / "run" / "base", pair / "run" / "base")  # same tokenizer and initial weights
    config = write_pipeline(pair, str(pair / "run"), [stage(GLOBAL_BATCH // 2)])
    port, logs = str(free_port()), [pair / "rank0.txt", pair / "rank1.txt"]
    ranks = [start([sys.executable, "-m", "stages.launch",
                    "sft_reasoning", "--config", str(config), "--accelerate-config", str(MULTI_CPU),
                    "--num-machines", "2", "--num-processes", "2", "--machine-rank", str(rank),
                    "--main-process-ip", "127.0.0.1", "--main-process-port", port], log)
             for rank, log in enumerate(logs)]
    finish(ranks, logs)

    reference, distributed = losses(single / "run"), losses(pair / "run")
    assert sorted(reference) == list(range(1, STEPS + 1))
    lines = (pair / "run" / "sft_reasoning" / "metrics.jsonl").read_text().splitlines()
    logged = [entry["step"] for entry in map(json.loads, lines) if "loss" in entry]
    assert logged == list(range(1, STEPS + 1))  # once per step: rank 0 alone wrote them
    # Each process saw 4 examples a step: equal losses mean both ranks' halves went into every step.
    for step, loss in reference.items():
        assert distributed[step] == pytest.approx(loss, abs=1e-5), f"step {step}"
    expected = load_file(single / "run" / "sft_reasoning" / "final" / "model.safetensors")
    trained = load_file(pair / "run" / "sft_reasoning" / "final" / "model.safetensors")
    assert expected.keys() == trained.keys()
    # Gradients summed across ranks differ from one process's in float order only; Adam divides by their
    # root mean square, so a near-zero gradient's rounding can move a weight by a few 1e-5 (one step's
    # update is learning rate 3e-3): 1e-4 is still far below any step of the update.
    for name, tensor in expected.items():
        assert (trained[name] - tensor).abs().max().item() <= 1e-4, name
