"""requirements.lock: complete, consistent with pyproject.toml, and what the environment holds.

The README's commands install exactly the lock (``scripts/setup.sh``); these tests fail when
pyproject.toml changes without a new lock, and when a lock-built environment drifts from it.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
PYTHONS = ("3.10", "3.11", "3.12", "3.13", "3.14")
"""Python versions the universal lock must cover (``requires-python = ">=3.10"``)."""


def locked() -> list[tuple[Requirement, list[str]]]:
    """Each pin of the lock (``name==version ; marker``) with its hashes."""
    pins: list[tuple[Requirement, list[str]]] = []
    for line in LOCK.read_text().splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            pins.append((Requirement(line.rstrip(" \\")), []))
        elif m := re.match(r"^\s+--hash=(sha256:[0-9a-f]{64})", line):
            pins[-1][1].append(m.group(1))
    return pins


def pin_for(name: str, python: str) -> str | None:
    """The version the lock pins ``name`` to on Linux x86-64 with that Python."""
    env = {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
    }
    for req, _ in locked():
        if canonicalize_name(req.name) == canonicalize_name(name) and (
            req.marker is None or req.marker.evaluate(env)
        ):
            return next(iter(req.specifier)).version
    return None


def test_every_pin_is_exact_and_hashed():
    pins = locked()
    assert len(pins) > 50
    for req, hashes in pins:
        (spec,) = req.specifier
        assert spec.operator == "==", req
        assert hashes, f"{req.name} has no hash"
    names = {canonicalize_name(r.name) for r, _ in pins}
    assert "torch" not in names  # setup.sh pins torch itself; GPU users keep their build
    assert not {n for n in names if n.startswith(("nvidia-", "cuda-", "triton"))}


def test_the_lock_satisfies_pyproject_on_every_python():
    """Every direct dependency (with the dev extra and the build backend) is pinned, within its
    pyproject.toml range, for every supported Python; torch's CPU dependencies are pinned."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    direct = [
        *project["project"]["dependencies"],
        *project["project"]["optional-dependencies"]["dev"],
        *project["build-system"]["requires"],
    ]
    # torch's CPU dependencies, as scripts/lock.sh gives them to uv.
    (torch_meta,) = tomllib.loads((ROOT / "scripts/lock-uv.toml").read_text())[
        "dependency-metadata"
    ]
    torch_deps = torch_meta["requires-dist"]
    for python in PYTHONS:
        for spec in direct + torch_deps:
            req = Requirement(spec)
            if req.name == "torch":
                continue
            got = pin_for(req.name, python)
            assert got is not None, f"{req.name} is not in the lock for Python {python}"
            assert req.specifier.contains(got, prereleases=True), (
                f"the lock has {req.name}=={got} for Python {python}, outside {req.specifier}:"
                " run bash scripts/lock.sh"
            )


def test_a_lock_built_environment_holds_exactly_the_lock():
    """Where scripts/setup.sh built this environment from the lock (its stamp file), every pin
    that applies here is the installed version: what the README's commands promise."""
    if not (Path(sys.prefix) / ".tokattr-installed").exists():
        pytest.skip("this environment was not built from the lock by scripts/setup.sh")
    wrong = []
    for req, _ in locked():
        if req.marker is not None and not req.marker.evaluate():
            continue
        want = next(iter(req.specifier)).version
        try:
            got = version(req.name)
        except PackageNotFoundError:
            got = None
        if got != want:
            wrong.append(f"{req.name}: locked {want}, installed {got}")
    assert not wrong, wrong
