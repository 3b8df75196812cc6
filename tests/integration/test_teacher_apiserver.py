"""A student FineTuneJob starts when its teacher succeeds — noticed through the FineTuneJob watch alone.

The real operator in-process against the real API server (see test_operator_apiserver.py), with the resync
loop set to an hour: whatever re-checks the waiting student here is the watch on FineTuneJobs mapping a
teacher to the students that wait on it (teacher.Dependents). The teacher's trainer is played by the test's
node (a termination message with the export's digest); its output is on the operator's output PVC, a real
claim bound to a hostPath PV so that the scheduler places the pods.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from apiserver_util import core_url, ftj_url, job_url, running_operator, wait
from test_operator_apiserver import bound_pod, manifest, phase_is, status_of

from finetune_operator.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

CLAIM = "outputs"
SETTINGS = Settings(trainer_image="trainer:test", resync_seconds=3600, http_listen="", output_pvc=CLAIM)
SHA = "cd" * 32


@pytest.fixture
def output_claim(apiserver, it_namespace) -> Iterator[str]:
    """The operator's output PVC in the test's namespace, bound to a PV made for it."""
    api, ns = apiserver.api, it_namespace
    pv = f"{ns}-outputs"
    api.create("/api/v1/persistentvolumes", {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "",
                 "hostPath": {"path": f"/tmp/{pv}"}, "claimRef": {"namespace": ns, "name": CLAIM}}})
    api.create(core_url(ns, "persistentvolumeclaims"), {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv,
                 "resources": {"requests": {"storage": "1Gi"}}}})
    wait(lambda: (api.get(core_url(ns, "persistentvolumeclaims", CLAIM)).get("status") or {}).get("phase") == "Bound",
         what="the output PVC to bind")
    yield CLAIM
    api.delete(f"/api/v1/persistentvolumes/{pv}")


def test_a_waiting_student_starts_on_its_teachers_success_through_the_watch(apiserver, it_namespace,
                                                                            output_claim) -> None:
    api, ns, node = apiserver.api, it_namespace, apiserver.node
    student = {"dataset": {"builtin": "digits"}, "distillation": {"teacher": {"fromJob": "big"}}}
    with running_operator(apiserver.cluster, ns, SETTINGS):
        teacher = api.create(ftj_url(ns), manifest("big"))
        api.create(ftj_url(ns), manifest("small", student))
        waiting = wait(phase_is(api, ns, "small", "Pending", "WaitingForTeacher"), what="the student waiting")
        assert waiting["distillation"]["teacher"]["job"] == "big"
        assert api.get(job_url(ns, "small")) is None

        pod = bound_pod(api, ns, teacher)
        node.set_running(pod)
        summary = {"weightsFile": "model.safetensors", "sha256": SHA, "bestEpoch": 3, "valAccuracy": 0.9}
        node.set_terminated(api.get(core_url(ns, "pods", pod["metadata"]["name"])), message=json.dumps(summary))
        wait(phase_is(api, ns, "big", "Succeeded"), what="the teacher Succeeded")

        job = wait(lambda: api.get(job_url(ns, "small")), what="the student's Job, created on the teacher's event")
        pod_spec = job["spec"]["template"]["spec"]
        (mount,) = [m for m in pod_spec["containers"][0]["volumeMounts"] if m["mountPath"].endswith("/teacher")]
        claims = {v["name"]: (v.get("persistentVolumeClaim") or {}).get("claimName") for v in pod_spec["volumes"]}
        assert mount["readOnly"] is True and mount["subPath"] == "big" and claims[mount["name"]] == CLAIM, mount
        shown = wait(lambda: status_of(api, ns, "small").get("jobName") and status_of(api, ns, "small"),
                     what="the student's status with its Job")["distillation"]["teacher"]
        assert shown["sha256"] == SHA and shown["claim"] == CLAIM and shown["path"] == mount["mountPath"], shown
        job_file = api.get(core_url(ns, "configmaps", "small-spec"))["data"]["job.yaml"]
        assert f"fromJob: {mount['mountPath']}" in job_file
