"""Start a stage under ``accelerate launch`` with the settings the Makefile passes through.

Empty settings are left to accelerate's defaults; the accelerate config file comes from the command
line, else from the profile's ``accelerate_config``, else the single-process CPU config when no GPU is
present. The stage itself then runs as ``python -m stages <stage>`` in every process. A stage that
already finished with this config starts no processes at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from stages.config import load_config
from stages.runner import StageContext, check_finished
from stages.schema import ConfigError

CPU_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "accelerate" / "cpu.yaml"
PASSED_THROUGH = ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port")


def launch_command(args: argparse.Namespace, accelerate_config: str | None) -> list[str]:
    config_file = args.accelerate_config or accelerate_config
    if not config_file and not torch.cuda.is_available():
        config_file = str(CPU_CONFIG)
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        command += ["--config_file", config_file]
    for name in PASSED_THROUGH:
        value = getattr(args, name)
        if value:
            command += [f"--{name}", value]
    return command + ["-m", "stages", args.stage, "--config", args.config, "--profile", args.profile]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.launch")
    parser.add_argument("stage")
    parser.add_argument("--config", default="pipeline.yaml")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--accelerate-config", default="")
    for name in PASSED_THROUGH:
        parser.add_argument("--" + name.replace("_", "-"), default="")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.profile)  # fail on a bad config before starting processes
        ctx = StageContext(config, config.stage(args.stage))
        if check_finished(ctx):
            print(f"{args.stage}: already finished with this config ({ctx.done_marker}); nothing to do", flush=True)
            return 0
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = launch_command(args, config.accelerate_config)
    print("+ " + " ".join(command), flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
