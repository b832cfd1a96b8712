"""The run report from a run directory's own files: the eval table per stage and the plots."""

from __future__ import annotations

import json

from stages.config import load_config
from stages.report import write_report
from tests.conftest import ROOT


def test_report_tables_every_evaluated_stage_and_draws_the_plots(tmp_path):
    config = load_config(ROOT / "pipeline.yaml")
    config.run_dir = str(tmp_path)
    for i, stage in enumerate(["sft_reasoning", "rpo"]):
        directory = tmp_path / stage
        directory.mkdir()
        summary = {"math/think/accuracy": 0.5 + i / 10, "math/think/mean_length": 70.0,
                   "math/no_think/mean_length": 10.0 + i}
        (directory / "eval.json").write_text(json.dumps({"summary": summary}))
        (directory / "DONE.json").write_text(json.dumps({"steps": 10}))
    (tmp_path / "sft_reasoning" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in (1, 2, 3)))
    for r in range(2):                                            # RPO logs per round; steps run on
        (tmp_path / "rpo" / f"round_{r}").mkdir()
        (tmp_path / "rpo" / f"round_{r}" / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 0.5, "accuracy": 0.9}) + "\n" for s in (5, 10)))
    (tmp_path / "manifest.json").write_text(json.dumps({
        "config_hash": "0123456789abcdef", "git": {"commit": "a" * 40, "dirty": True},
        "stages": {"rpo": {"started_at": "2026-01-01T10:00:00+0000", "ended_at": "2026-01-01T10:02:30+0000",
                           "attempts": 2}}}))
    path = write_report(config)
    text = path.read_text()
    assert "Commit `aaaaaaaaaaaa` with uncommitted changes, config hash `0123456789abcdef`" in text
    assert "`rpo` (rpo): finished, 10 steps in 2.5 min (2 attempts)" in text
    assert "| math accuracy /think | 0.50 | 0.60 |" in text
    assert "| mean response length /no_think (tokens) | 10.00 | 11.00 |" in text
    assert "`sft_chat` (sft): not finished" in text and "`rpo` (rpo): finished, 10 steps" in text
    for image in ("loss.png", "eval.png"):
        assert (tmp_path / image).read_bytes()[:4] == b"\x89PNG" and f"]({image})" in text
    assert not (tmp_path / "grpo.png").exists()                  # no GRPO metrics yet
