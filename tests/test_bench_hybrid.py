"""The hybrid benchmark compares like with like: same depth and width, about the same parameter count."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

from bench.bench_hybrid import Shape, configs, main, parameters, parse_shapes, twin_pattern
from bench.common import bench_tokenizer
from model.factory import build_model


def test_twin_swaps_every_mamba_layer_for_attention():
    assert twin_pattern("M-M*-M-") == "*-**-*-"


@pytest.mark.parametrize("full", [False, True])
def test_twin_has_the_hybrids_parameter_count(full):
    pair = configs("nemotron-h-8b", full)
    hybrid, twin = pair["hybrid"], pair["transformer"]
    assert twin["hybrid_override_pattern"].count("*") == hybrid["hybrid_override_pattern"].count("M") + 4
    assert twin["hidden_size"] == hybrid["hidden_size"]
    assert abs(parameters(twin) - parameters(hybrid)) / parameters(hybrid) < 1e-3


def test_shapes_parse_and_name_the_bad_one():
    assert parse_shapes("64/128x1,8/2048x64") == [Shape(64, 128, 1), Shape(8, 2048, 64)]
    with pytest.raises(argparse.ArgumentTypeError, match="'64-128x1'"):
        parse_shapes("64/128x1,64-128x1")


def test_bench_writes_both_models_per_shape(tmp_path):
    """The command end to end at tiny shapes: table, CSV and plot, and memory that grows only with KV."""
    main(["--layout", "tiny", "--shapes", "8/16x1,8/64x2", "--repeats", "1", "--out", str(tmp_path)])
    with (tmp_path / "hybrid.csv").open() as handle:
        rows = {(r["model"], int(r["output_len"])): r for r in csv.DictReader(handle)}
    assert set(rows) == {(m, n) for m in ("hybrid", "transformer") for n in (16, 64)}
    assert all(float(r["tokens_per_s"]) > 0 and float(r["decode_tokens_per_s"]) > 0 and 0 < float(r["of_roofline"])
               for r in rows.values())
    mib = {key: float(r["state_mib_per_seq"]) for key, r in rows.items()}
    for model in ("hybrid", "transformer"):
        assert mib[model, 64] > mib[model, 16]           # both have attention layers
    # The tiny pattern has 3 attention layers in the hybrid and 6 in the twin: twice the KV growth.
    growth = {m: mib[m, 64] - mib[m, 16] for m in ("hybrid", "transformer")}
    assert growth["transformer"] == pytest.approx(2 * growth["hybrid"])
    table_rows = [line for line in (tmp_path / "hybrid.md").read_text().splitlines() if line.startswith("| 8 |")]
    assert len(table_rows) == 2 and all("x |" in line for line in table_rows)
    assert (tmp_path / "hybrid.png").stat().st_size > 10_000


def test_profile_counts_the_decode_steps_alone(tmp_path, capsys):
    """Each decode step runs every Linear of the model once, one aten::mm each on CPU; the prefill's calls
    and a wrong count of steps would both move the calls per step off that number."""
    main(["--layout", "tiny", "--shapes", "8/16x2", "--out", str(tmp_path), "--profile", "40"])
    out = capsys.readouterr().out
    tokenizer = bench_tokenizer()
    for name, config in configs("tiny", full=False).items():
        linears = sum(isinstance(m, torch.nn.Linear) for m in build_model("tiny", tokenizer, **config).modules())
        section = out.split(f"# {name} decode profile")[1].split("\n# ")[0]
        rows = {line.split(maxsplit=2)[2]: float(line.split()[1]) for line in section.splitlines()[3:] if line.strip()}
        assert "over 15 decode steps" in section and rows["aten::mm"] == linears
