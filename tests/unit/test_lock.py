"""requirements/*.lock (hack/lock.py, `make lock`) against pyproject.toml: complete, hashed, one set of versions.

Fails when a dependency was added or re-pinned in pyproject.toml without `make lock`, when an entry has no
hash, when the image locks disagree with the venv's, or when the torch/torchvision pair left its pins.
"""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
LOCKS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE_LOCKS = {"operator": ["operator"], "serve": ["serve"], "trainer": ["trainer"],
               "operator-dev": ["operator", "dev"]}
TORCH_FAMILY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
LINUX_311 = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.11",
             "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}


@cache
def lock(name: str) -> dict[str, tuple[Version, Requirement, list[str]]]:
    """name -> (version, the requirement line, its sha256 hashes)."""
    out = {}
    text = (LOCKS / f"{name}.lock").read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        if not block or block.startswith("#"):
            continue
        req = Requirement(block.splitlines()[0].rstrip(" \\"))
        (spec,) = req.specifier
        assert spec.operator == "==", f"{name}.lock: {req} is not pinned"
        out[canonicalize_name(req.name)] = (Version(spec.version), req, re.findall(r"--hash=sha256:([0-9a-f]{64})",
                                                                                  block))
    return out


def wanted(extras: list[str]) -> list[Requirement]:
    """pyproject.toml's core dependencies plus those of `extras`, as they apply on the images' Linux/3.11."""
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(LINUX_311)]


def test_every_entry_is_pinned_and_hashed() -> None:
    for path in sorted(LOCKS.glob("*.lock")):
        entries = lock(path.stem)
        assert entries, path
        unhashed = [n for n, (_, _, hashes) in entries.items() if not hashes]
        assert not unhashed, f"{path.name}: entries without --hash: {unhashed}"


@pytest.mark.parametrize("name, extras", [("dev", sorted(PYPROJECT["project"]["optional-dependencies"])),
                                          *IMAGE_LOCKS.items()])
def test_every_dependency_of_pyproject_is_locked_within_its_specifier(name: str, extras: list[str]) -> None:
    entries = {**lock(name), **(lock("torch") if name == "trainer" else {})}
    problems = []
    for req in wanted(extras):
        got = entries.get(canonicalize_name(req.name))
        if got is None:
            problems.append(f"{req} is not in {name}.lock")
        elif not req.specifier.contains(got[0], prereleases=True):
            problems.append(f"{req}: {name}.lock has {got[0]}")
    assert not problems, "pyproject.toml changed without `make lock`:\n" + "\n".join(problems)


def test_the_venv_and_the_images_get_the_same_versions() -> None:
    dev = lock("dev")
    for name in [*IMAGE_LOCKS, "torch"]:
        differ = {n: (str(v), str(dev[n][0]) if n in dev else None) for n, (v, _, _) in lock(name).items()
                  if n not in dev or dev[n][0] != v}
        assert not differ, f"{name}.lock disagrees with dev.lock: {differ}"


def test_the_build_backend_is_locked_so_installs_need_no_build_isolation() -> None:
    backend = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    for name in ("dev", "operator", "serve", "trainer", "operator-dev"):
        for req in backend:
            got = lock(name).get(canonicalize_name(req.name))
            assert got and req.specifier.contains(got[0]), f"{name}.lock lacks {req} (build backend)"


def test_torch_pair_stays_pinned_and_only_in_the_trainer_locks() -> None:
    pins = {canonicalize_name(r.name): r for r in wanted(["trainer"]) if r.name in ("torch", "torchvision")}
    for name in ("dev", "torch"):
        for pkg, req in pins.items():
            assert str(lock(name)[pkg][0]) == next(iter(req.specifier)).version, f"{name}.lock moved {pkg}"
    assert not [n for n in lock("trainer") if TORCH_FAMILY.match(n)], "torch.lock holds those (TORCH_INDEX_URL)"
    assert all(TORCH_FAMILY.match(n) for n in lock("torch"))
    for name in ("operator", "serve", "operator-dev"):
        assert "torch" not in lock(name), f"{name}.lock would put torch in a torch-free image"


def test_make_venv_installs_from_the_lock_with_hashes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(STAMP): pyproject.toml requirements/dev.lock\n", 1)[1].split("\n\n", 1)[0]
    assert "pip install -q --require-hashes -r requirements/dev.lock" in recipe
    assert "--no-deps --no-build-isolation -e ." in recipe
    assert "requirements/dev.lock" in makefile.split("STAMP :=", 1)[1].splitlines()[0], "a relock reinstalls"
