"""The operator end to end: Helm chart installed, real API server, real Job controller and garbage collector.

What runs: a namespace enforcing Pod Security "restricted" (any violation by the operator or a trainer pod
fails), the CRD from charts/finetune-operator/crds/, the chart installed there with helm (the operator runs
with its own ServiceAccount and the chart's RBAC only — a missing rule shows up as a 403 in its log and a
test that does not converge). On the local control plane the pods really run on its node (hack/testenv/
kubelet_node.py: the upstream kubelet and containerd), from the project's operator and trainer images.

``FINETUNE_E2E_CHART=<dir>`` installs another copy of the chart (how the RBAC proof was made: a copy with one
rule removed fails here with the 403 from the operator's log). On kind (hack/kind-e2e.sh) the chart is
installed by the script: ``FINETUNE_E2E_OPERATOR=installed`` and ``FINETUNE_E2E_OPERATOR_NAMESPACE`` say
where; the jobs then go to a fresh restricted namespace.

Proves (issues 3, 4, 6): the CRD rejects the bad_manifests/ corpus naming the field; the CPU example
reaches Succeeded with its output recorded while `kubectl get ftj` shows epoch/loss/accuracy moving and
/metrics carries the job's gauges; a trainer failure ends Failed with a reason and a Warning event, not
retried; suspend/resume; deletion cascades to Job, pods, ConfigMap and token Secret; an operator restart
mid-run keeps one Job.

Jobs are tiny (examples/cpu-demo.yaml with 2 digit classes at 16 px, 2 epochs): each is mostly the
trainer's `import torch`.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402
from operator_env import TRAIN_TIMEOUT, wait_until  # noqa: E402
from operator_util import (  # noqa: E402
    TERMINAL,
    Jobs,
    TableWatch,
    bad_manifests,
    metric_samples,
    tiny_job,
)

# ---------------------------------------------------------------- 1. the CRD's validation

BAD = [b for b in bad_manifests() if b.reason is None]  # the rest run in test_reliability.py


def test_the_corpus_is_large_enough_and_the_base_job_is_valid(k8s, restricted_namespace):
    """At least 30 bad manifests in all; the good tiny job passes the same strict server-side dry run."""
    jobs = Jobs(k8s, restricted_namespace)
    assert len(bad_manifests()) >= 30, f"only {len(bad_manifests())} manifests in tests/e2e/bad_manifests"
    assert len(BAD) >= 10, f"only {len(BAD)} manifests the schema must reject"
    jobs.create(tiny_job("good"), dry_run="All", field_validation="Strict")


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_crd_rejects_malformed_manifest_naming_the_field(k8s, restricted_namespace, bad):
    """Server-side dry run with fieldValidation=Strict (what `kubectl apply --validate=strict` sends)."""
    jobs = Jobs(k8s, restricted_namespace)
    with pytest.raises(client.ApiException) as info:
        jobs.create(bad.body, dry_run="All", field_validation="Strict")
    err = info.value
    assert err.status == bad.status, f"{bad.path.name}: wanted HTTP {bad.status}, got {err.status}: {err.body}"
    body = json.loads(err.body)
    causes = [c for c in (body.get("details") or {}).get("causes") or [] if c.get("field") not in (None, "<nil>")]
    if causes:  # 422 Invalid: the field of every real cause is the one the manifest breaks
        fields = sorted({c["field"] for c in causes})
        assert fields == [bad.field], (
            f"{bad.path.name}: the error names {fields}, wanted only {bad.field!r}: {body['message']}")
    else:  # strict decoding (unknown field): 400 with the field in the message
        assert f'"{bad.field}"' in body["message"] or f"{bad.field}:" in body["message"], (
            f"{bad.path.name}: {bad.field!r} not named in: {body['message']}")


# ---------------------------------------------------------------- 2. the CPU example end to end


def test_cpu_example_succeeds_with_live_progress_in_kubectl_get_and_metrics(operator_env, jobs, e2e_report):
    env, name = operator_env, "cpu-demo"
    t0 = time.monotonic()
    with TableWatch(env.api, jobs.ns, name) as watch:
        jobs.create(tiny_job(name, {"training": {"epochs": 3}}))  # two epoch ends before the last
        done = env.wait_phase(jobs, name, ("Succeeded",), TRAIN_TIMEOUT)
        time.sleep(0.5)  # the watch's last events
    took = time.monotonic() - t0
    status = done["status"]
    out = status.get("output") or {}
    assert len(out.get("sha256") or "") == 64, f"status.output has no sha256: {out}"
    assert 0.0 <= float(out.get("valAccuracy", -1)) <= 1.0, f"status.output has no valAccuracy: {out}"
    assert status.get("completionTime") and status.get("jobName"), status
    assert out.get("weightsFile"), out
    pvc = env.pvc_dir(env.output_pvc) if env.output_pvc else None
    if pvc is not None:  # the model outlives the pod, on the output PVC (its directory on the local node)
        folder = pvc / name
        model_json = folder / "model.json"
        assert model_json.exists(), (
            f"no model.json on the output PVC ({folder}): {sorted(folder.parent.rglob('*'))[:20]}")
        doc = json.loads(model_json.read_text())
        weights = folder / out["weightsFile"]
        assert doc["sha256"] == out["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert out.get("ephemeral") is not True, out

    # Issue 4: `kubectl get ftj` showed the numbers moving before the job finished.
    assert not env.http_problem, f"progress cannot reach the operator: {env.http_problem}"
    assert watch.rows, f"the Table watch saw nothing ({watch.error})"
    running = [r for _, r in watch.rows if r.get("Phase") == "Running"]
    live = [r for r in running if _epoch(r.get("Epoch")) is not None
            and _epoch(r["Epoch"])[0] < _epoch(r["Epoch"])[1] and isinstance(r.get("Loss"), (int, float))]
    assert live, ("no `kubectl get ftj` row while Running with epoch < total and a loss value; rows seen:\n"
                  + watch.describe())
    distinct = {(r.get("Epoch"), r.get("Loss"), r.get("Val-Acc")) for r in running if r.get("Loss") is not None}
    assert len(distinct) >= 2, f"progress columns did not move while Running:\n{watch.describe()}"
    assert any(r.get("Val-Acc") is not None for r in running), (
        f"no Val-Acc while Running (epochs ended before the job did):\n{watch.describe()}")
    final = jobs.table(name)[0]
    assert final["Phase"] == "Succeeded" and _epoch(final["Epoch"]) == (3, 3), final
    e2e_report(f"cpu-demo (tiny) Succeeded in {took:.0f} s; `kubectl get ftj` rows while Running: "
               + " | ".join(f"{r['Epoch']} loss={r['Loss']} acc={r.get('Val-Acc')} eta={r.get('ETA')}"
                            for r in live[:4]))

    # /metrics has the job's gauges (read through the API server's service proxy) ...
    text = env.metrics()
    acc = [v for labels, v in metric_samples(text, "finetune_job_val_accuracy")
           if labels.get("namespace") == jobs.ns and labels.get("name") == name]
    assert acc, "finetune_job_val_accuracy has no series for the job:\n" + "\n".join(
        line for line in text.splitlines() if line.startswith("finetune_job_val_accuracy"))
    assert abs(acc[0] - float(status["progress"]["valAccuracy"])) < 1e-3, (acc, status["progress"])
    # ... until the job is deleted (no stale series).
    jobs.delete(name)
    wait_until(lambda: not [1 for labels, _ in metric_samples(env.metrics(), "finetune_job_val_accuracy")
                       if labels.get("namespace") == jobs.ns and labels.get("name") == name],
          30, "the job's finetune_job_val_accuracy series to go with the job")


def _epoch(text: Any) -> tuple[int, int] | None:
    try:
        done, total = str(text).split("/")
        return int(done), int(total)
    except ValueError:
        return None


# ---------------------------------------------------------------- 3. failures in the trainer


def test_invalid_dataset_path_fails_in_the_trainer_with_reason_and_is_not_retried(operator_env, jobs):
    env, name = operator_env, "no-data"
    job = tiny_job(name, {
        "dataset": {"builtin": None, "path": "/data/does-not-exist", "classes": None},
        "volumes": [{"name": "data", "mountPath": "/data", "emptyDir": {}}],
        "runPolicy": {"backoffLimit": 2},  # retries allowed, yet exit 2 (invalid job file) is never retried
    })
    jobs.create(job)
    obj = env.wait_phase(jobs, name, ("Failed",), 120)
    status = obj["status"]
    assert status["reason"] == "InvalidJobFile", status
    assert "does-not-exist" in status.get("message", ""), f"the message does not say what is wrong: {status}"
    k8s_job = jobs.batch.read_namespaced_job(status["jobName"], jobs.ns)
    assert (k8s_job.status.failed or 0) == 1, f"retried: {k8s_job.status}"
    assert len(jobs.pods(obj)) == 1, [p.metadata.name for p in jobs.pods(obj)]
    assert status.get("attempts") == 1, status
    cond = {c["type"]: c for c in status.get("conditions") or []}
    assert cond["Failed"]["status"] == "True" and cond["Ready"]["status"] == "False", cond
    wait_until(lambda: jobs.event_counts(name).get(("Warning", "InvalidJobFile")), 15,
          f"a Warning event InvalidJobFile on {name}: {jobs.event_counts(name)}")


def test_deadline_exceeded_fails_with_reason_and_warning(operator_env, jobs):
    env, name = operator_env, "too-slow"
    jobs.create(tiny_job(name, {"runPolicy": {"activeDeadlineSeconds": 3, "backoffLimit": 0}}))
    obj = env.wait_phase(jobs, name, ("Failed",), 90)
    assert obj["status"]["reason"] == "DeadlineExceeded", obj["status"]
    assert "activeDeadlineSeconds" in obj["status"]["message"], obj["status"]
    wait_until(lambda: jobs.event_counts(name).get(("Warning", "DeadlineExceeded")), 15,
          f"a Warning event DeadlineExceeded on {name}: {jobs.event_counts(name)}")


# ---------------------------------------------------------------- 4. suspend / resume


def test_suspend_then_resume(operator_env, jobs):
    env, name = operator_env, "held"
    jobs.create(tiny_job(name, {"runPolicy": {"suspend": True}}))
    obj = env.wait_phase(jobs, name, ("Suspended",), 60)
    job_name = obj["status"]["jobName"]
    k8s_job = jobs.batch.read_namespaced_job(job_name, jobs.ns)
    assert k8s_job.spec.suspend is True, "the Job of a suspended FineTuneJob is not suspended"
    time.sleep(2)  # long enough for a wrongly created pod to show up
    assert not jobs.pods(obj), f"pods of a suspended job: {[p.metadata.name for p in jobs.pods(obj)]}"
    assert (jobs.batch.read_namespaced_job(job_name, jobs.ns).status.active or 0) == 0
    assert jobs.event_counts(name).get(("Normal", "Suspended")), jobs.event_counts(name)

    jobs.patch(name, {"spec": {"runPolicy": {"suspend": False}}})
    wait_until(lambda: jobs.batch.read_namespaced_job(job_name, jobs.ns).spec.suspend is False, 30,
          "the operator to resume the Job (spec.suspend false)", give_up=env.forbidden)
    wait_until(lambda: [p for p in jobs.pods(obj) if p.status.phase == "Running"], 60, "a running trainer pod")
    obj = env.wait_phase(jobs, name, ("Running",), 60)
    assert obj["status"]["jobName"] == job_name
    wait_until(lambda: jobs.event_counts(name).get(("Normal", "Resumed")), 15,
               f"a Resumed event: {jobs.event_counts(name)}")


# ---------------------------------------------------------------- 5. deletion cascades


def test_delete_cascades_to_job_pods_configmap_and_token_secret(operator_env, jobs):
    env, name = operator_env, "doomed"
    jobs.create(tiny_job(name))
    obj = jobs.get(name)

    def children():
        owned = jobs.owned(obj)
        running = [p.metadata.name for p in jobs.pods(obj) if p.status.phase == "Running"]
        return owned if all(owned.values()) and running else None

    try:
        owned = wait_until(children, 60, f"the Job, ConfigMap, token Secret and a running pod of {name}",
                      give_up=env.forbidden)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{env.diagnose(jobs, name)}") from None
    pods = [p.metadata.name for p in jobs.pods(obj)]
    jobs.delete(name)  # what `kubectl delete ftj` sends (background propagation): the garbage collector's turn

    def remaining():
        left = {k: v for k, v in jobs.owned(obj).items() if v}
        left_pods = [p.metadata.name for p in jobs.pods(obj)]
        if left_pods:
            left["Pod"] = left_pods
        if jobs.get(name) is not None:
            left["FineTuneJob"] = [name]
        return left

    deadline = time.monotonic() + 90
    while (left := remaining()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left after deleting FineTuneJob {name} (had {owned}, pods {pods}): {left}"


# ---------------------------------------------------------------- 6. operator restart mid-run


def test_operator_restart_mid_run_keeps_one_job(operator_env, jobs, e2e_report):
    env, name = operator_env, "survivor"
    core = client.CoreV1Api(env.api)
    # All ten digit classes: epochs long enough that the trainer outlives the operator's replacement, which on
    # a real kubelet takes a pod start and a readiness probe (several seconds).
    jobs.create(tiny_job(name, {"dataset": {"classes": None, "maxImagesPerClass": None}, "training": {"epochs": 6}}))
    obj = env.wait_phase(jobs, name, ("Running",), 90)
    k8s_job = jobs.batch.read_namespaced_job(obj["status"]["jobName"], jobs.ns)
    job_uid = k8s_job.metadata.uid

    old = [p.metadata.name for p in env.operator_pods()]
    assert len(old) == 1, f"expected one operator pod, found {old}"
    t0 = time.monotonic()
    core.delete_namespaced_pod(old[0], env.operator_namespace)

    def new_operator_ready():
        pods = env.operator_pods()
        if any(p.metadata.name in old for p in pods):
            return None
        ready = [p for p in pods if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
        return ready[0].metadata.name if ready else None

    new = wait_until(new_operator_ready, 90, f"a new operator pod (Ready) replacing {old[0]}", give_up=env.forbidden)
    new_since = core.read_namespaced_pod(new, env.operator_namespace).metadata.creation_timestamp
    back_after = time.monotonic() - t0
    phase_then = jobs.status(name).get("phase")
    # The trainer pod itself, not the status (nobody writes it while the operator is gone), must still run.
    trainer_phases = [p.status.phase for p in jobs.pods(jobs.get(name))]
    assert phase_then not in TERMINAL and "Running" in trainer_phases, (
        f"the job finished (status {phase_then}, pods {trainer_phases}) before the operator was back: the test "
        "proves nothing; make it longer")

    obj = env.wait_phase(jobs, name, ("Succeeded",), TRAIN_TIMEOUT)
    owned_jobs = [j for j in jobs.batch.list_namespaced_job(jobs.ns).items
                  if any(r.uid == obj["metadata"]["uid"] for r in j.metadata.owner_references or [])]
    assert [j.metadata.uid for j in owned_jobs] == [job_uid], (
        f"Jobs of {name} after the restart: {[(j.metadata.name, j.metadata.uid) for j in owned_jobs]}, "
        f"before: {job_uid}")
    counts = jobs.event_counts(name, obj["metadata"]["uid"])
    assert counts.get(("Normal", "JobCreated")) == 1, f"JobCreated events: {counts}"
    assert counts.get(("Normal", "Succeeded")) == 1, f"Succeeded events: {counts}"
    assert (obj["status"].get("output") or {}).get("sha256"), obj["status"]
    # The new operator took the trainer's pushes: it read the job's token back from its Secret.
    assert not env.http_problem, f"progress cannot reach the operator: {env.http_problem}"
    progress = obj["status"].get("progress") or {}
    updated = progress.get("lastUpdateTime")
    assert progress.get("epoch") == 6 and updated, (
        f"the last epoch's progress never arrived: {progress}\n{env.push_diagnosis(jobs, obj)}")
    assert updated >= new_since.strftime("%Y-%m-%dT%H:%M:%SZ"), (
        f"no progress accepted by the new operator (created {new_since}): last update {updated}")
    e2e_report(f"operator restart: {old[0]} -> {new} Ready in {back_after:.1f} s while {name} was {phase_then}; "
               f"one Job ({job_uid[:8]}), events {dict((r, n) for (_, r), n in counts.items())}")


# ---------------------------------------------------------------- 7. RBAC: nothing the operator did was refused


def test_operator_was_never_refused_by_rbac(operator_env):
    """Runs last: a rule missing from the chart's RBAC shows up as a 403 in the operator's log.

    (Whatever the operator does in the tests above — create Jobs, ConfigMaps, token Secrets, Events,
    patch status, read Secrets back after a restart — was allowed by the chart's own rules.)
    """
    problem = operator_env.forbidden()
    assert problem is None, problem
