"""The stage targets pass accelerate's launch settings through, and refuse a bad config before launching."""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch

from stages.launch import CPU_CONFIG, PASSED_THROUGH, launch_command
from tests.conftest import ROOT


def _args(**values: str) -> argparse.Namespace:
    defaults = {name: "" for name in PASSED_THROUGH} | {"accelerate_config": ""}
    return argparse.Namespace(stage="sft_chat", config="pipeline.yaml", profile="tiny", **(defaults | values))


def test_settings_pass_through_to_accelerate_launch():
    command = launch_command(_args(num_processes="16", num_machines="2", machine_rank="1",
                                   main_process_ip="10.0.0.1", main_process_port="29500",
                                   accelerate_config="configs/accelerate/zero3.yaml"), None)
    joined = " ".join(command)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    for flag in ("--config_file configs/accelerate/zero3.yaml", "--num_processes 16", "--num_machines 2",
                 "--machine_rank 1", "--main_process_ip 10.0.0.1", "--main_process_port 29500"):
        assert flag in joined
    assert command[-7:] == ["-m", "stages", "sft_chat", "--config", "pipeline.yaml", "--profile", "tiny"]


def test_profile_config_is_used_unless_overridden_and_cpu_is_the_fallback():
    assert "from-profile.yaml" in launch_command(_args(), "from-profile.yaml")
    assert "cli.yaml" in launch_command(_args(accelerate_config="cli.yaml"), "from-profile.yaml")
    command = launch_command(_args(), None)
    assert (str(CPU_CONFIG) in command) == (not torch.cuda.is_available())
    assert not any(flag in command for flag in ("--num_processes", "--machine_rank"))


def test_bad_stage_stops_before_anything_launches():
    result = subprocess.run([sys.executable, "-m", "stages.launch", "sft_reasonin"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown stage 'sft_reasonin'" in result.stderr
    assert "accelerate.commands.launch" not in result.stdout
