"""deploy/argocd/finetunejob-health.lua, run in Lua 5.1 (what Argo CD's gopher-lua speaks) via lupa.

Samples are hand-written statuses for every phase plus statuses the operator's own status code
produces, so a renamed phase or condition in the operator breaks this test, not a user's Argo CD.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml

lupa = pytest.importorskip("lupa.lua51", reason="lupa (dev extra) runs the Lua health check")

from finetune_api.status import PHASES  # noqa: E402
from finetune_operator.parsed import FineTuneJob  # noqa: E402
from finetune_operator.settings import Settings  # noqa: E402
from finetune_operator.status import derive_status, invalid_spec_status  # noqa: E402

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
SCRIPT = (ROOT / "deploy/argocd/finetunejob-health.lua").read_text()
NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def health(obj: dict[str, Any]) -> dict[str, str]:
    """Run the check the way Argo CD does: the resource as the global `obj`, the script's return value."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return {k: result[k] for k in ("status", "message") if result[k] is not None}


def ftj(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1", "generation": generation},
        "spec": {"dataset": {"builtin": "digits"}, "training": {"epochs": 3}},
    }
    if status is not None:
        doc["status"] = status
    return doc


def cond(kind: str, value: bool, reason: str = "R", message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True" if value else "False", "reason": reason, "message": message}


def phase_status(phase: str, reason: str, message: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "phase": phase,
        "reason": reason,
        "message": message,
        "observedGeneration": 1,
        "conditions": [
            cond("Ready", phase == "Succeeded", reason),
            cond("Reconciling", phase in ("Pending", "Running"), reason),
            cond("Stalled", phase == "Failed", reason),
        ],
        **extra,
    }


@pytest.mark.parametrize(
    "status, expected, words",
    [
        (None, "Progressing", "operator"),
        ({}, "Progressing", "operator"),
        (phase_status("Pending", "Creating", "creating Job demo"), "Progressing", "creating Job demo"),
        (phase_status("Pending", "ImagePullBackOff", "back-off pulling"), "Progressing", "ImagePullBackOff"),
        (
            phase_status("Running", "Running", "training in pod demo-x", progress={"epochText": "2/3"}),
            "Progressing",
            "epoch 2/3",
        ),
        (phase_status("Succeeded", "Succeeded", "the model is in /output"), "Healthy", "/output"),
        (phase_status("Failed", "OOMKilled", "the trainer ran out of memory"), "Degraded", "OOMKilled"),
        (phase_status("Failed", "InvalidSpec", "spec.training.epochs: >= 1"), "Degraded", "InvalidSpec"),
        (phase_status("Suspended", "Suspended", "Job demo is suspended"), "Suspended", "suspended"),
    ],
    ids=["no-status", "empty-status", "creating", "image-pull", "running", "succeeded", "oom", "invalid", "suspended"],
)
def test_phases_map_to_argocd_health(status: dict[str, Any] | None, expected: str, words: str) -> None:
    result = health(ftj(status))
    assert result["status"] == expected
    assert words in result["message"]


def test_running_but_stalled_is_degraded() -> None:
    status = phase_status("Running", "Running", "training")
    status["conditions"][2] = cond("Stalled", True, "ProgressDeadlineExceeded", "no progress for more than 600s")
    result = health(ftj(status))
    assert result == {"status": "Degraded", "message": "ProgressDeadlineExceeded: no progress for more than 600s"}


def test_an_unobserved_spec_change_is_progressing_even_after_success() -> None:
    result = health(ftj(phase_status("Succeeded", "Succeeded"), generation=2))
    assert result["status"] == "Progressing" and "generation 2" in result["message"]


def test_without_a_phase_the_kstatus_conditions_decide() -> None:
    ready = {"conditions": [cond("Ready", True), cond("Reconciling", False)]}
    reconciling = {"conditions": [cond("Ready", False), cond("Reconciling", True)]}
    stalled = {"conditions": [cond("Stalled", True, "Boom", "broken")]}
    assert health(ftj(ready))["status"] == "Healthy"
    assert health(ftj(reconciling))["status"] == "Progressing"
    assert health(ftj(stalled))["status"] == "Degraded"
    assert health(ftj({"phase": "Exploded"}))["status"] == "Unknown"


@pytest.mark.parametrize("phase", PHASES)
def test_every_operator_phase_has_a_definite_health(phase: str) -> None:
    assert health(ftj(phase_status(phase, phase)))["status"] in {"Healthy", "Progressing", "Degraded", "Suspended"}


def test_statuses_the_operator_writes() -> None:
    obj = ftj()
    pending = derive_status(FineTuneJob.from_body(obj), None, [], NOW, Settings())
    assert health(ftj(pending))["status"] == "Progressing"
    failed = invalid_spec_status(FineTuneJob.from_body(obj), "spec.training.epochs: Input should be >= 1", NOW)
    result = health(ftj(failed))
    assert result["status"] == "Degraded" and "InvalidSpec" in result["message"]


def test_the_argocd_cm_patch_embeds_this_script() -> None:
    patch = yaml.safe_load((ROOT / "deploy/argocd/argocd-cm-patch.yaml").read_text())
    assert patch["kind"] == "ConfigMap" and patch["metadata"]["name"] == "argocd-cm"
    assert patch["data"]["resource.customizations.health.finetune.dev_FineTuneJob"] == SCRIPT
