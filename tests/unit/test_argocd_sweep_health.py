"""deploy/argocd/finetunesweep-health.lua in Lua 5.1 (Argo CD's gopher-lua) via lupa, on statuses the sweep
controller itself plans (finetune_operator.sweep.plan), so a renamed phase or field breaks this test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

lupa = pytest.importorskip("lupa.lua51", reason="lupa (dev extra) runs the Lua health check")

from test_operator_sweep import NOW, as_created, succeeded, sweep_body  # noqa: E402

from finetune_operator.sweep import plan  # noqa: E402

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
SCRIPT = (ROOT / "deploy/argocd/finetunesweep-health.lua").read_text()


def health(obj: dict[str, Any]) -> dict[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return {k: result[k] for k in ("status", "message") if result[k] is not None}


def with_status(status: dict[str, Any] | None) -> dict[str, Any]:
    return sweep_body(status) if status is not None else sweep_body()


def test_no_status_yet_is_progressing() -> None:
    assert health(with_status(None))["status"] == "Progressing"


def test_a_running_sweep_is_progressing_with_its_trial_count() -> None:
    body = sweep_body()
    created = plan(body, [], NOW).create
    status = plan(body, [as_created(t, "Running", "Running") for t in created], NOW).status
    result = health(with_status(status))
    assert result["status"] == "Progressing" and result["message"].startswith("trials 0/4"), result


def test_a_finished_sweep_is_healthy_naming_its_best_trial() -> None:
    body = sweep_body(trials={"max": 2, "parallel": 2})
    created = plan(body, [], NOW).create
    status = plan(body, [succeeded(created[0], 0.7), succeeded(created[1], 0.9)], NOW).status
    result = health(with_status(status))
    assert result["status"] == "Healthy" and "best lr-001" in result["message"], result


def test_too_many_failed_trials_and_an_invalid_spec_are_degraded() -> None:
    body = sweep_body(trials={"max": 2, "parallel": 2, "maxFailed": 0})
    created = plan(body, [], NOW).create
    failed = plan(body, [as_created(created[0], "Failed", "TrainerError")], NOW).status
    assert health(with_status(failed)) == {"status": "Degraded", "message": f"TooManyFailedTrials: {failed['message']}"}
    invalid = plan(sweep_body(parameters=[{"path": "nope", "categorical": [1]}]), [], NOW).status
    assert health(with_status(invalid))["status"] == "Degraded"


def test_an_older_status_than_the_spec_is_progressing() -> None:
    body = sweep_body({"phase": "Succeeded", "observedGeneration": 1})
    body["metadata"]["generation"] = 2
    assert health(body)["status"] == "Progressing"


def test_the_argocd_cm_patch_embeds_this_script() -> None:
    patch = yaml.safe_load((ROOT / "deploy/argocd/argocd-cm-patch.yaml").read_text())
    assert patch["data"]["resource.customizations.health.finetune.dev_FineTuneSweep"] == SCRIPT
