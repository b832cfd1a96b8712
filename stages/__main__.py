"""Command line: run one stage, or evaluate a checkpoint.

    accelerate launch -m stages sft_reasoning --config pipeline.yaml --profile tiny
    python -m stages eval --checkpoint runs/tiny/base --eval-stage sft_reasoning
    python -m stages report
    python -m stages rerun-from rpo      # move rpo and later stages aside so they train again
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from stages.checkpoints import DiskFull
from stages.config import load_config
from stages.environment import EnvironmentMismatch, check_environment
from stages.schema import ConfigError

STAGE_MODULES = {"sft": "stages.sft", "rpo": "stages.rpo", "grpo": "stages.grpo"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", help="a stage name from pipeline.yaml, 'eval', 'report' or 'rerun-from'")
    parser.add_argument("first", nargs="?", help="rerun-from: the first stage to train again")
    parser.add_argument("--config", default="pipeline.yaml", help="pipeline file (default: pipeline.yaml)")
    parser.add_argument("--profile", default="tiny", help="profile of the pipeline file (default: tiny)")
    parser.add_argument("--checkpoint", help="eval: the checkpoint directory to evaluate")
    parser.add_argument("--eval-stage", help="eval: whose eval settings to use (default: the first stage)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.stage not in ("report", "rerun-from"):       # those two load no model
            check_environment()
        config = load_config(args.config, args.profile)
        if args.stage == "eval":
            return evaluate_checkpoint(config, args.checkpoint, args.eval_stage)
        if args.stage == "report":
            from stages.report import write_report

            print(f"report: {write_report(config)}")
            return 0
        from stages.runner import run_stage, supersede

        if args.stage == "rerun-from":
            if not args.first:
                raise ConfigError("rerun-from needs a stage name, e.g. `python -m stages rerun-from rpo`")
            moved = supersede(config, args.first)
            print(f"rerun from {args.first}: " + (f"earlier results moved to {moved}" if moved else "nothing to move"))
            return 0
        stage = config.stage(args.stage)
        run_stage(config, stage.name, importlib.import_module(STAGE_MODULES[stage.kind]))
    except (ConfigError, EnvironmentMismatch) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DiskFull as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def evaluate_checkpoint(config, checkpoint: str | None, stage_name: str | None) -> int:
    """Evaluate any checkpoint with a stage's eval settings; writes eval.json beside it."""
    from model.factory import load_model, load_tokenizer
    from stages.evaluate import evaluate, print_table
    from stages.runner import DTYPES

    if not checkpoint:
        raise ConfigError("eval needs --checkpoint DIR")
    spec = config.stage(stage_name).eval if stage_name else config.stages[0].eval
    model = load_model(checkpoint, dtype=DTYPES[config.model.dtype])
    report = evaluate(model, load_tokenizer(checkpoint), spec, config.rollout.cuda_graphs)
    (Path(checkpoint) / "eval.json").write_text(json.dumps(report, indent=2))
    print_table(report, title=f"{checkpoint}: held-out evaluation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
