"""Static checks of the Dockerfile (the image tests in tests/images build and run it for real)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
TEXT = (ROOT / "Dockerfile").read_text()


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", TEXT)
    out: dict[str, list[str]] = {}
    current = None
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or match.group(1)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def test_two_targets_from_a_base_image_argument() -> None:
    s = stages()
    assert {"operator", "trainer"} <= set(s)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.\d+\.\d+-slim-\w+$", TEXT, re.MULTILINE), "pin the default base"
    froms = re.findall(r"^FROM\s+(\S+)", TEXT, re.MULTILINE)
    assert all(f == "${BASE_IMAGE}" or f in s for f in froms), f"every stage starts from BASE_IMAGE: {froms}"


@pytest.mark.parametrize("target, uid", [("operator", 65532), ("trainer", 1000), ("serve", 1000)])
def test_final_stages_are_non_root_and_hold_no_build_tools(target: str, uid: int) -> None:
    body = "\n".join(stages()[target])
    users = re.findall(r"^USER\s+(\d+)(?::(\d+))?$", body, re.MULTILINE)
    assert users and int(users[-1][0]) == uid != 0, "numeric non-root USER (runAsNonRoot checks the number)"
    assert not re.search(r"^RUN\b", body, re.MULTILINE), "final stages only COPY the built venv"
    assert "COPY --from=" in body


def test_operator_never_installs_torch_and_trainer_never_installs_kopf() -> None:
    s = stages()
    operator_build = " ".join(s["operator-build"])
    trainer_build = " ".join(s["trainer-build"])
    assert ".[operator]" in operator_build and "torch" not in operator_build.replace('"import torch"', "")
    assert ".[trainer]" in trainer_build and ".[operator]" not in trainer_build
    assert 'import torch"' in operator_build and 'import kopf"' in trainer_build, "each build proves it"


def test_versions_are_pinned() -> None:
    assert "PIP_CONSTRAINT=/tmp/constraints.txt" in TEXT
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "hack/images/constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    lowered = {k.lower(): v for k, v in pins.items()}
    for package in ("torch", "torchvision", "kopf", "kubernetes", "pydantic", "setuptools"):
        assert package in lowered, f"{package} is not pinned in hack/images/constraints.txt"
    assert "finetune-operator" not in lowered


def test_torch_index_is_a_build_argument_defaulting_to_cpu_wheels() -> None:
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in TEXT


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines() if x.strip() and x[0] != "#"]
    assert lines[0] == "*", "allow-list: nothing but the listed paths reaches the build context"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "api", "trainer", "operator", "serve",
                       "hack/images/constraints.txt"}
    for copied in re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", TEXT, re.MULTILINE):
        for src in copied.split():
            assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"


def test_the_serve_image_installs_kserve_and_onnxruntime_and_proves_it_has_no_torch() -> None:
    build = " ".join(stages()["serve-build"])
    assert ".[serve]" in build and ".[trainer]" not in build and "TORCH_INDEX_URL" not in build
    assert '! python3 -c "import torch"' in build and "import finetune_serve.server" in build
    assert 'ENTRYPOINT ["finetune-serve"]' in " ".join(stages()["serve"])
