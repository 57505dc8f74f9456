"""The dependency range refuses the two withdrawn Lightning releases, and the tested set is inside it."""

from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def requirement(name: str) -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == name)


def test_the_compromised_lightning_releases_are_excluded():
    spec = requirement("lightning").specifier
    assert not spec.contains("2.6.2") and not spec.contains("2.6.3")  # GHSA-w37p-236h-pfx3
    assert spec.contains("2.6.1") and spec.contains("2.6.6")


def test_every_pinned_version_of_the_tested_set_is_allowed_by_pyproject():
    pins = dict(
        line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#")
    )
    for name in ("lightning", "transformers", "peft", "trl", "datasets", "evaluate", "jsonargparse"):
        version = pins[name].split(";")[0].strip()
        assert requirement(name).specifier.contains(version), f"constraints.txt pins {name}=={version} outside pyproject"
