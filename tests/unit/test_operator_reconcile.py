"""reconcile() against an in-memory fake API: create-if-absent, invalid spec, ownership, stopping a Job."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any

import kopf
import pytest

from finetune_operator.events import build_event
from finetune_operator.handlers import _owner_name
from finetune_operator.kube import ApiError, merge_patch_for
from finetune_operator.naming import ANNOTATION_NAME, LABEL_UID
from finetune_operator.reconcile import Runtime, reconcile, reconcile_on_event
from finetune_operator.settings import Settings

pytestmark = pytest.mark.unit
NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
LOG = logging.getLogger("test")


class FakeKube:
    """Objects by path; POST to a collection stores under collection/name, like the API."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []

    def get(self, path: str) -> dict[str, Any] | None:
        self.calls.append(("GET", path))
        return self.objects.get(path)

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("POST", path))
        key = f"{path}/{body['metadata']['name']}"
        if key in self.objects:
            raise ApiError(409, "already exists")
        self.objects[key] = body
        return body

    def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("PATCH", path))
        target = self.objects[path.removesuffix("/status")]
        for key, value in patch.items():
            target[key] = {**(target.get(key) or {}), **value} if isinstance(value, dict) else value
        return target

    def delete(self, path: str) -> None:
        self.calls.append(("DELETE", path))
        self.objects.pop(path, None)

    def list(self, path: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        return [o for k, o in self.objects.items() if k.startswith(path + "/")]

    def events(self) -> list[tuple[str, str]]:
        return [(o["type"], o["reason"]) for k, o in self.objects.items() if "/events/" in k]


FTJ_PATH = "/apis/finetune.dev/v1alpha1/namespaces/ml/finetunejobs/demo"
JOB_PATH = "/apis/batch/v1/namespaces/ml/jobs/demo"


def setup(spec: dict[str, Any] | None = None, settings: Settings | None = None) -> tuple[Runtime, FakeKube]:
    kube = FakeKube()
    kube.objects[FTJ_PATH] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "uid-1", "generation": 1},
        "spec": spec or {"dataset": {"builtin": "digits"}},
    }
    rt = Runtime(settings=settings or Settings(), kube=kube, clock=lambda: NOW)  # type: ignore[arg-type]
    return rt, kube


def test_creates_configmap_and_owned_job_once() -> None:
    rt, kube = setup()
    outcome = reconcile(rt, "ml", "demo", LOG)
    assert outcome.status["phase"] == "Pending" and outcome.status["jobName"] == "demo"
    job = kube.objects[JOB_PATH]
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert "/api/v1/namespaces/ml/configmaps/demo-spec" in kube.objects
    assert kube.objects[FTJ_PATH]["status"]["phase"] == "Pending"
    assert ("Normal", "JobCreated") in kube.events() and ("Warning", "EphemeralOutput") in kube.events()
    reconcile(rt, "ml", "demo", LOG)  # a second pass (restart, event, resync) creates nothing
    assert [c for c in kube.calls if c[0] == "POST" and "jobs" in c[1]] == [
        ("POST", "/apis/batch/v1/namespaces/ml/jobs")
    ]
    assert rt.queue.unfinished() == [("ml", "demo")]


def test_invalid_spec_fails_without_children_and_is_not_tracked() -> None:
    rt, kube = setup({"dataset": {"builtin": "digits"}, "training": {"epochs": 0}})
    outcome = reconcile(rt, "ml", "demo", LOG)
    assert outcome.invalid and outcome.invalid.startswith("spec.training.epochs")
    assert kube.objects[FTJ_PATH]["status"]["reason"] == "InvalidSpec"
    assert JOB_PATH not in kube.objects
    assert ("Warning", "InvalidSpec") in kube.events()
    assert rt.queue.unfinished() == []


def test_a_job_owned_by_someone_else_is_waited_for() -> None:
    rt, kube = setup()
    kube.objects[JOB_PATH] = {"metadata": {"name": "demo", "ownerReferences": [{"uid": "old-uid"}]}}
    with pytest.raises(kopf.TemporaryError, match="not owned by this FineTuneJob"):
        reconcile(rt, "ml", "demo", LOG)


def test_api_errors_become_temporary_errors() -> None:
    rt, kube = setup()

    def broken(path: str) -> None:
        raise ApiError(503, "etcd is sad")

    kube.get = broken  # type: ignore[assignment]
    with pytest.raises(kopf.TemporaryError, match="503"):
        reconcile(rt, "ml", "demo", LOG)


def test_startup_deadline_failure_deletes_the_job() -> None:
    rt, kube = setup(settings=Settings(startup_deadline_seconds=60))
    reconcile(rt, "ml", "demo", LOG)
    job = kube.objects[JOB_PATH]
    job["metadata"]["creationTimestamp"] = "2025-03-01T11:00:00Z"  # an hour ago
    job["status"] = {"active": 1}
    kube.objects["/api/v1/namespaces/ml/pods/demo-x"] = {
        "metadata": {"name": "demo-x", "labels": {LABEL_UID: "uid-1"}},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {"name": "trainer", "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}
            ],
        },
    }
    outcome = reconcile(rt, "ml", "demo", LOG)
    assert (outcome.status["phase"], outcome.status["reason"]) == ("Failed", "ErrImagePull")
    assert JOB_PATH not in kube.objects
    assert rt.queue.unfinished() == []
    reconcile(rt, "ml", "demo", LOG)  # the Job is gone; the failure stays and nothing is re-created
    assert JOB_PATH not in kube.objects


def test_deleted_finetunejob_is_forgotten() -> None:
    rt, kube = setup()
    reconcile(rt, "ml", "demo", LOG)
    del kube.objects[FTJ_PATH]
    assert reconcile(rt, "ml", "demo", LOG).status is None
    assert rt.queue.unfinished() == []


def test_merge_patch_sends_only_changes_and_nulls_removed_keys() -> None:
    old = {"phase": "Pending", "reason": "Creating", "progress": {"epoch": 1, "valAccuracy": 0.5}}
    new = {"phase": "Running", "progress": {"epoch": 1, "valAccuracy": 0.6}}
    assert merge_patch_for(old, new) == {"phase": "Running", "reason": None, "progress": {"valAccuracy": 0.6}}
    assert merge_patch_for(new, new) == {}


def test_owner_name_from_job_owner_reference_or_pod_annotation() -> None:
    job = {
        "metadata": {
            "ownerReferences": [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "demo"}]
        }
    }
    assert _owner_name(job) == "demo"
    pod = {"metadata": {"annotations": {ANNOTATION_NAME: "x" * 100}}}
    assert _owner_name(pod) == "x" * 100
    assert _owner_name({"metadata": {}}) is None


def test_events_name_the_object_and_have_unique_names() -> None:
    ftj = {"metadata": {"name": "demo", "namespace": "ml", "uid": "u"}}
    a, b = (build_event(ftj, "Warning", "OOMKilled", "m" * 5000, NOW) for _ in range(2))
    assert a["metadata"]["name"] != b["metadata"]["name"]
    assert a["involvedObject"]["uid"] == "u" and a["type"] == "Warning"
    assert len(a["message"]) == 1024


def test_workers_get_an_owned_headless_service_before_the_job_and_single_workers_none() -> None:
    rt, kube = setup({"dataset": {"builtin": "digits"}, "workers": 2})
    reconcile(rt, "ml", "demo", LOG)
    svc = kube.objects["/api/v1/namespaces/ml/services/demo"]
    assert svc["spec"]["clusterIP"] == "None" and svc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    posts = [path for verb, path in kube.calls if verb == "POST" and "events" not in path]
    assert posts.index("/api/v1/namespaces/ml/services") < posts.index("/apis/batch/v1/namespaces/ml/jobs")
    reconcile(rt, "ml", "demo", LOG)  # reused, not created twice
    assert [p for v, p in kube.calls if v == "POST" and p.endswith("/services")] == ["/api/v1/namespaces/ml/services"]
    rt, kube = setup()
    reconcile(rt, "ml", "demo", LOG)
    assert not any("/services" in path for _, path in kube.calls)


def test_a_multi_worker_name_that_cannot_be_a_hostname_is_an_invalid_spec() -> None:
    rt, kube = setup({"dataset": {"builtin": "digits"}, "workers": 2})
    kube.objects[FTJ_PATH]["metadata"]["name"] = "demo.v2"
    kube.objects["/apis/finetune.dev/v1alpha1/namespaces/ml/finetunejobs/demo.v2"] = kube.objects.pop(FTJ_PATH)
    outcome = reconcile(rt, "ml", "demo.v2", LOG)
    assert outcome.invalid and outcome.invalid.startswith("spec.workers: a FineTuneJob with 2 workers")
    assert not any(v == "POST" and ("jobs" in p or "services" in p) for v, p in kube.calls)


class BlockingKube(FakeKube):
    """The first GET of the FineTuneJob waits until the test lets it go: a pass held in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def get(self, path: str) -> dict[str, Any] | None:
        if path == FTJ_PATH and not self.release.is_set():
            self.entered.set()
            assert self.release.wait(10)
        return super().get(path)


def test_a_burst_of_watch_events_during_a_pass_costs_one_more_pass_not_one_each() -> None:
    rt, _ = setup()
    kube = BlockingKube()
    kube.objects = rt.kube.objects
    rt.kube = kube
    first = threading.Thread(target=reconcile_on_event, args=(rt, "ml", "demo", LOG))
    first.start()
    assert kube.entered.wait(10)
    for _ in range(5):  # pod and Job events while the pass runs: each returns at once
        reconcile_on_event(rt, "ml", "demo", LOG)
    kube.release.set()
    first.join(10)
    passes = [c for c in kube.calls if c == ("GET", FTJ_PATH)]
    assert len(passes) == 2, f"{len(passes)} passes for 6 events"  # the one running + one after the burst
    reconcile_on_event(rt, "ml", "demo", LOG)  # nothing in flight: an event runs its own pass
    assert len([c for c in kube.calls if c == ("GET", FTJ_PATH)]) == 3


def test_resync_takes_only_jobs_no_event_has_refreshed_within_the_period() -> None:
    rt, _ = setup()
    reconcile(rt, "ml", "demo", LOG)
    assert rt.queue.unfinished() == [("ml", "demo")]
    assert rt.queue.due(30.0) == []  # just derived
    assert rt.queue.due(0.0) == [("ml", "demo")]
