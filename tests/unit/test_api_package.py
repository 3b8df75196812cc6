"""The API package is the contract both sides share: it imports neither torch nor kopf nor kubernetes, it
holds the one definition of the progress wire format, and the project claims the Python it runs on."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "api" / "finetune_api"


def test_the_api_package_imports_no_framework() -> None:
    code = ("import sys, finetune_api.spec, finetune_api.status, finetune_api.progress, finetune_api.errors; "
            "bad = [m for m in ('torch', 'torchvision', 'timm', 'kopf', 'kubernetes', 'finetune_trainer', "
            "'finetune_operator') if m in sys.modules]; print(bad); assert not bad")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_progress_fields_are_defined_once() -> None:
    """No module but finetune_api.progress lists the pushed field names (a second list would drift)."""
    from finetune_api.progress import PROGRESS_FIELDS, ProgressEvent
    from finetune_trainer import http_report

    assert http_report.FIELDS is PROGRESS_FIELDS
    assert set(PROGRESS_FIELDS) | {"event"} == set(ProgressEvent.model_fields)
    fields = set(PROGRESS_FIELDS) - {"epoch", "step"}  # common words: only the camelCase names are telling
    for path in [*ROOT.joinpath("trainer").rglob("*.py"), *ROOT.joinpath("operator").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                names = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                assert len(names & fields) < 4, f"{path.relative_to(ROOT)}:{node.lineno} lists progress fields"


def test_the_claimed_python_is_the_one_the_code_is_written_for() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    floor = re.fullmatch(r">=\s*3\.(\d+)", project["project"]["requires-python"])
    assert floor, project["project"]["requires-python"]
    assert project["tool"]["ruff"]["target-version"] == f"py3{floor[1]}"
    assert sys.version_info >= (3, int(floor[1]))
    assert f"Python ≥ 3.{floor[1]}" in (ROOT / "README.md").read_text()


def test_the_status_schema_in_the_crd_is_generated_from_the_status_model() -> None:
    import yaml

    from finetune_api.status import FineTuneJobStatus, Progress
    from finetune_operator import crd

    checked_in = yaml.safe_load((ROOT / "charts/finetune-operator/crds/finetunejobs.finetune.dev.yaml").read_text())
    status = checked_in["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status == crd.status_schema()
    assert set(status["properties"]) == set(FineTuneJobStatus.model_fields)
    assert set(status["properties"]["progress"]["properties"]) == set(Progress.model_fields)

    def keys(node):
        if isinstance(node, dict):
            for k, v in node.items():
                yield k
                if k != "properties":
                    yield from keys(v)
                else:
                    for sub in v.values():
                        yield from keys(sub)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)

    assert "default" not in set(keys(status)), "the API server must add nothing to a status"
