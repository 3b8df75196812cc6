"""A FineTuneSweep against the real API server and controllers, its trainers played by the test.

Cheaper than e2e for what it shows: the sweep CRD accepts what the controller writes (status subresource,
strict schema), the trial watch drives the sweep, median stopping sets finetune.dev/stop on exactly the
trial behind the median, and the FineTuneJob reconciler then deletes that trial's Job and ends it Failed
with reason Pruned (never back to Running); the next trial starts in its place. Progress is written to
the trials' status as the operator's progress endpoint would; pods finish through the test's node.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from apiserver_util import core_url, ftj_url, job_url, running_operator, wait
from test_operator_apiserver import bound_pod, status_of

from finetune_operator.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SETTINGS = Settings(trainer_image="trainer:test", resync_seconds=3600, http_listen="")


def sweep_url(ns: str, name: str = "", sub: str = "") -> str:
    return "/".join(p for p in (f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunesweeps", name, sub) if p)


def sweep_status(api, ns: str, name: str) -> dict[str, Any]:
    return (api.get(sweep_url(ns, name)) or {}).get("status") or {}


def test_median_stopping_prunes_the_trial_behind_the_median_and_its_job_goes(apiserver, it_namespace) -> None:
    api, ns, node = apiserver.api, it_namespace, apiserver.node
    manifest = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "med"},
        "spec": {"template": {"spec": {"dataset": {"builtin": "digits"}, "training": {"epochs": 3}}},
                 "parameters": [{"path": "head.dropout", "categorical": [0.0, 0.1, 0.2, 0.3]}],
                 "algorithm": {"grid": {}}, "trials": {"max": 4, "parallel": 3},
                 "pruning": {"medianStop": {"startEpoch": 1, "minTrials": 2}}},
    }
    with running_operator(apiserver.cluster, ns, SETTINGS):
        api.create(sweep_url(ns), manifest)
        trials = [f"med-00{i}" for i in range(3)]
        wait(lambda: all(api.get(job_url(ns, t)) for t in trials), what="three trials with their Jobs")
        assert api.get(ftj_url(ns, "med-003")) is None, "parallel 3: the fourth waits"
        for name, accuracy in zip(trials, (0.9, 0.2, 0.8), strict=True):  # what the progress endpoint writes
            api.merge_patch(ftj_url(ns, name, "status"), {"status": {"progress": {"epoch": 1,
                                                                                   "valAccuracy": accuracy}}})
        pruned = wait(lambda: status_of(api, ns, "med-001").get("reason") == "Pruned" and status_of(
            api, ns, "med-001"), what="med-001 Pruned")
        assert pruned["phase"] == "Failed" and "worse than the median" in pruned["message"], pruned
        body = api.get(ftj_url(ns, "med-001"))
        assert body["metadata"]["annotations"]["finetune.dev/stop"].startswith("Pruned: valAccuracy 0.2 at epoch 1")
        wait(lambda: api.get(job_url(ns, "med-001")) is None, what="the pruned trial's Job deleted")
        for other in ("med-000", "med-002"):
            assert "finetune.dev/stop" not in (api.get(ftj_url(ns, other))["metadata"].get("annotations") or {})
        wait(lambda: api.get(job_url(ns, "med-003")), what="the fourth trial, started in the pruned one's place")
        status = wait(lambda: sweep_status(api, ns, "med").get("pruned") == 1 and sweep_status(api, ns, "med"),
                      what="the sweep counting one pruned trial")
        assert (status["created"], status["running"], status["trialsText"]) == (4, 3, "1/4"), status
        history = {t["name"]: t.get("history") for t in status["trials"]}
        assert history["med-001"] == [{"epoch": 1, "value": 0.2}], history
        events = api.list(core_url(ns, "events"), fields="involvedObject.kind=FineTuneSweep,involvedObject.name=med")
        assert {"TrialCreated", "TrialPruned"} <= {e["reason"] for e in events}, [e["reason"] for e in events]

        # The others finish (a trainer's termination message): the sweep Succeeds with the best of them.
        summaries = {"med-000": 0.93, "med-002": 0.81, "med-003": 0.88}
        for name, accuracy in summaries.items():
            ftj = api.get(ftj_url(ns, name))
            pod = bound_pod(api, ns, ftj)
            node.set_running(pod)
            message = {"weightsFile": "model.safetensors", "sha256": f"{int(accuracy * 100):02d}" * 32,
                       "bestEpoch": 3, "valAccuracy": accuracy}
            node.set_terminated(api.get(core_url(ns, "pods", pod["metadata"]["name"])), message=json.dumps(message))
        done = wait(lambda: sweep_status(api, ns, "med").get("phase") == "Succeeded" and sweep_status(api, ns, "med"),
                    what="the sweep Succeeded")
        assert done["best"]["job"] == "med-000" and done["best"]["model"]["sha256"] == "93" * 32, done["best"]
        assert status_of(api, ns, "med-001")["reason"] == "Pruned", "a pruned trial stays pruned"
