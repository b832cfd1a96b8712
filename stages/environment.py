"""The installed packages against the versions ``pyproject.toml`` asks for, checked before a stage runs.

An environment built by hand (a GPU container's own Python, say) can hold older releases than the
pipeline runs on, and they fail far from the cause: transformers 5.23 ignores the ``cache=`` argument
the GRPO stage passes, and a tensor shape error follows several calls later. Named up front instead.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

PROJECT = "hybrid-posttrain"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements() -> list[Requirement]:
    """The project's runtime requirements: from pyproject.toml in a clone, else the installed metadata."""
    if PYPROJECT.exists():
        lines = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    else:
        lines = [line for line in metadata.requires(PROJECT) or [] if "extra ==" not in line]
    return [Requirement(line) for line in lines]


def mismatches() -> list[str]:
    """One line per installed package outside its required range (a missing one fails at its import)."""
    found = []
    for requirement in requirements():
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            found.append(f"{requirement.name} {installed} is installed, the pipeline needs {requirement}")
    return found


class EnvironmentMismatch(RuntimeError):
    """Installed packages outside the ranges the pipeline runs on."""


def check_environment() -> None:
    """Raise ``EnvironmentMismatch`` naming every package outside its range."""
    if found := mismatches():
        raise EnvironmentMismatch("; ".join(found) + ". `make setup` (or `pip install -c constraints.txt -e .`) "
                                  "installs the tested versions.")
