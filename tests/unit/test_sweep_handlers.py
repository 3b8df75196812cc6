"""One sweep pass against the in-memory fake API: create-if-absent, restarts, stopping, status writes."""

from __future__ import annotations

import copy
import logging

import kopf
import pytest
from test_operator_reconcile import NOW, FakeKube
from test_operator_sweep import sweep_body

from finetune_api.status import STOP_ANNOTATION
from finetune_operator.reconcile import Runtime
from finetune_operator.settings import Settings
from finetune_operator.sweep_handlers import Sweeps, reconcile_sweep, sweep_path

pytestmark = pytest.mark.unit
LOG = logging.getLogger("test")
FTJS = "/apis/finetune.dev/v1alpha1/namespaces/ml/finetunejobs"


def operator(kube: FakeKube) -> Sweeps:
    """A fresh operator process: nothing in memory but what the API holds."""
    return Sweeps(Runtime(settings=Settings(), kube=kube, clock=lambda: NOW))  # type: ignore[arg-type]


def setup() -> FakeKube:
    kube = FakeKube()
    kube.objects[sweep_path("ml", "lr")] = sweep_body()
    return kube


def trial_names(kube: FakeKube) -> list[str]:
    return sorted(k.rsplit("/", 1)[1] for k in kube.objects if k.startswith(FTJS + "/"))


def test_a_pass_creates_the_first_trials_posts_their_events_and_writes_status() -> None:
    kube = setup()
    assert reconcile_sweep(operator(kube), "ml", "lr", LOG) is None
    assert trial_names(kube) == ["lr-000", "lr-001"]
    assert kube.events().count(("Normal", "TrialCreated")) == 2
    status = kube.objects[sweep_path("ml", "lr")]["status"]
    assert (status["created"], status["running"], status["trialsText"]) == (2, 2, "0/4")


def test_a_restart_before_status_was_written_creates_nothing_twice() -> None:
    kube = setup()
    reconcile_sweep(operator(kube), "ml", "lr", LOG)
    kube.objects[sweep_path("ml", "lr")].pop("status")  # as if the operator died before the status write
    posts = kube.calls.count(("POST", FTJS))
    reconcile_sweep(operator(kube), "ml", "lr", LOG)
    assert trial_names(kube) == ["lr-000", "lr-001"]
    assert kube.calls.count(("POST", FTJS)) == posts, "found by the list: not even asked again"
    assert kube.events().count(("Normal", "TrialCreated")) == 2


def test_a_same_named_finetunejob_of_someone_else_makes_the_pass_wait() -> None:
    kube = setup()
    kube.objects[f"{FTJS}/lr-000"] = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                      "metadata": {"name": "lr-000", "namespace": "ml", "uid": "other"}}
    with pytest.raises(kopf.TemporaryError, match="not a trial of this sweep"):
        reconcile_sweep(operator(kube), "ml", "lr", LOG)


def test_a_failed_sweep_stops_its_running_trials_through_the_annotation() -> None:
    kube = setup()
    kube.objects[sweep_path("ml", "lr")]["spec"]["trials"]["maxFailed"] = 0
    sw = operator(kube)
    reconcile_sweep(sw, "ml", "lr", LOG)
    first = kube.objects[f"{FTJS}/lr-000"]
    first["status"] = {"phase": "Failed", "reason": "TrainerError"}
    reconcile_sweep(sw, "ml", "lr", LOG)
    status = kube.objects[sweep_path("ml", "lr")]["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "TooManyFailedTrials")
    second = copy.deepcopy(kube.objects[f"{FTJS}/lr-001"])
    assert second["metadata"]["annotations"][STOP_ANNOTATION].startswith("Stopped: sweep lr TooManyFailedTrials")
    assert STOP_ANNOTATION not in (first["metadata"].get("annotations") or {})
    assert ("Warning", "TooManyFailedTrials") in kube.events() and ("Normal", "TrialStopped") in kube.events()
    assert trial_names(kube) == ["lr-000", "lr-001"]
