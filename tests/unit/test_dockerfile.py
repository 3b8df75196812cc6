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
    assert "requirements/operator.lock" in operator_build
    assert "torch" not in operator_build.replace('"import torch"', "")
    assert "requirements/trainer.lock" in trainer_build and "operator.lock" not in trainer_build
    assert 'import torch"' in operator_build and 'import kopf"' in trainer_build, "each build proves it"


def test_every_install_is_hash_checked_from_a_lock_and_the_project_builds_without_isolation() -> None:
    """requirements/*.lock (tests/unit/test_lock.py checks their content); pip never resolves on its own."""
    for stage in ("operator-build", "trainer-build", "serve-build"):
        installs = re.findall(r"pip install [^&;]*", " ".join(stages()[stage]))
        assert installs, stage
        for cmd in installs:
            from_lock = "--require-hashes" in cmd and re.search(r"-r /tmp/requirements/[\w-]+\.lock", cmd)
            project = cmd.split()[-1] == "." and "--no-deps" in cmd and "--no-build-isolation" in cmd
            torch_index = '--index-url "$TORCH_INDEX_URL"' in cmd and "--no-deps" in cmd
            assert from_lock or project or torch_index, f"{stage}: unchecked install: {cmd}"
        assert "pip check" in " ".join(stages()[stage]), f"{stage}: the installed set is not checked"
    trainer = " ".join(stages()["trainer-build"])
    # From TORCH_INDEX_URL: exactly the locked pair (versions read from torch.lock), nothing else.
    assert "grep -Eo '^(torch|torchvision)==[^ ;]+' /tmp/requirements/torch.lock" in trainer
    assert "COPY requirements/ /tmp/requirements/" in TEXT and "PIP_CONSTRAINT" not in TEXT


def test_torch_index_is_a_build_argument_defaulting_to_cpu_wheels() -> None:
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in TEXT


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines() if x.strip() and x[0] != "#"]
    assert lines[0] == "*", "allow-list: nothing but the listed paths reaches the build context"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "api", "trainer", "operator", "serve", "requirements"}
    for copied in re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", TEXT, re.MULTILINE):
        for src in copied.split():
            assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"


def test_the_serve_image_installs_kserve_and_onnxruntime_and_proves_it_has_no_torch() -> None:
    build = " ".join(stages()["serve-build"])
    assert "requirements/serve.lock" in build and "trainer.lock" not in build and "TORCH_INDEX_URL" not in build
    assert '! python3 -c "import torch"' in build and "import finetune_serve.server" in build
    assert 'ENTRYPOINT ["finetune-serve"]' in " ".join(stages()["serve"])
