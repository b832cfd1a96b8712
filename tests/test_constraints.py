"""constraints.txt, the versions `make setup` installs, must cover what pyproject.toml asks for."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

LEFT_TO_THE_MACHINE = {"torch", "triton"}     # the CPU build or a CUDA build, installed by the Makefile


def pinned() -> dict[str, str]:
    pins = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), start=1):
        if line.strip() and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
            assert match, f"constraints.txt line {number}: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_every_dependency_is_pinned_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    pins = pinned()
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        if name in LEFT_TO_THE_MACHINE:
            assert name not in pins
            continue
        assert name in pins, f"{name} is not in constraints.txt: run make constraints"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(requirement))


def test_a_stage_refuses_to_start_on_a_package_outside_its_range(monkeypatch, capsys, tmp_path):
    """An older transformers (one that ignores the GRPO stage's ``cache=``) is named before anything runs."""
    from importlib import metadata

    from stages.__main__ import main
    from stages.environment import mismatches

    assert mismatches() == []              # this environment is the one the tests pass in
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "5.23.0" if name == "transformers" else real(name))
    assert main(["grpo", "--config", str(tmp_path / "not-read.yaml")]) == 2     # checked before the config
    assert "transformers 5.23.0 is installed, the pipeline needs transformers>=5.24" in capsys.readouterr().err
