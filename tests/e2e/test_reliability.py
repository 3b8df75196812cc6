"""Faults and bad input against the installed operator (issue 8): nothing crashes, nothing is lost.

Same environment as test_operator.py (the chart in a restricted namespace, the output PVC, real Job
controller). Proves:
  * the bad-input corpus (tests/e2e/bad_manifests): every manifest is rejected by the schema naming the
    field, or accepted and then ends Failed with its reason — the operator neither restarts nor hot-loops;
  * a trainer pod deleted mid-run (SIGTERM) checkpoints, the Job retries without eating the backoff budget,
    the new pod resumes (resumeCount >= 1) and the result matches an uninterrupted local run within 1 point;
  * the operator killed five times (grace 0, the first right after the FineTuneJob is created) during a
    run: exactly one Job is ever created, and the job Succeeds with its output and final progress.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client  # noqa: E402
from operator_env import TRAIN_TIMEOUT, kill_operator, wait_until  # noqa: E402
from operator_util import TERMINAL, JobWatch, bad_manifests, metric_samples, tiny_job  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CORPUS = bad_manifests()
# A run long enough to be hit mid-epoch: all 10 digit classes (360 val images: 1 point = 3.6 images).
LONGER = {"dataset": {"imageSize": 16, "classes": None, "maxImagesPerClass": None},
          "training": {"epochs": 4, "batchSize": 32, "logEverySteps": 2}}


# ---------------------------------------------------------------- 1. the bad-input corpus


def _reconciles(env) -> float:
    return sum(v for _, v in metric_samples(env.metrics(), "finetune_reconcile_total"))


def _operator_restarts(env) -> dict[str, int]:
    return {p.metadata.name: sum(c.restart_count for c in p.status.container_statuses or [])
            for p in env.operator_pods()}


def test_bad_input_corpus_is_rejected_or_fails_with_a_reason_and_never_crashes_the_operator(
        operator_env, jobs, e2e_report):
    env = operator_env
    restarts_before = _operator_restarts(env)
    jobs.core.create_namespaced_config_map(jobs.ns, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="corpus-files"),
        data={"not-an-image": "GIF89a? no: plain text\n", "not-a-checkpoint": "this is not a checkpoint\n"}))
    rejected = 0
    for bad in (b for b in CORPUS if b.reason is None):
        with pytest.raises(client.ApiException) as info:
            jobs.create(bad.body, field_validation="Strict")
        assert info.value.status in (400, 422), f"{bad.id}: {info.value.status} {info.value.body[:300]}"
        assert bad.field in info.value.body, f"{bad.id}: {bad.field!r} not named: {info.value.body[:300]}"
        rejected += 1

    runtime = {f"corpus-{b.id.removeprefix('run-')}"[:63]: b for b in CORPUS if b.reason is not None}
    for name, bad in runtime.items():
        jobs.create({**bad.body, "metadata": {"name": name}}, field_validation="Strict")
    outcomes = {}
    for name in runtime:
        obj = env.wait_phase(jobs, name, TERMINAL, TRAIN_TIMEOUT)
        status = obj["status"]
        outcomes[name] = (status.get("phase"), status.get("reason"), status.get("message", ""))
    wrong = {n: o for n, o in outcomes.items()
             if o[:2] != ("Failed", runtime[n].reason) or runtime[n].field not in o[2]}
    assert not wrong, "\n".join(f"{n}: wanted Failed/{runtime[n].reason} naming {runtime[n].field!r}, got {o}"
                                for n, o in wrong.items())

    # No crash: the same operator pod, never restarted. No hot loop: finished jobs cause no reconciles.
    assert _operator_restarts(env) == restarts_before, (restarts_before, _operator_restarts(env))
    before, t0 = _reconciles(env), time.monotonic()
    time.sleep(10)
    per_second = (_reconciles(env) - before) / (time.monotonic() - t0)
    assert per_second < 1.0, f"{per_second:.1f} reconciles/s with every corpus job finished: a hot loop"
    e2e_report(f"bad-input corpus: {rejected} rejected by schema, {len(runtime)} failed with reason "
               f"({', '.join(sorted({o[1] for o in outcomes.values()}))}), 0 crashes "
               f"(operator restarts {sum(restarts_before.values())} -> {sum(_operator_restarts(env).values())}); "
               f"{per_second:.2f} reconciles/s afterwards")


# ---------------------------------------------------------------- 2. trainer pod deleted mid-epoch


def _reference_run(body: dict, folder: Path) -> subprocess.Popen:
    """The same job, uninterrupted, as a local process (started first: it overlaps the cluster run)."""
    job_file = folder / "job.yaml"
    job_file.write_text(yaml.safe_dump(body))
    return subprocess.Popen([str(Path(sys.executable).parent / "finetune-train"), "-f", str(job_file),
                             "--output", str(folder / "out"), "--report", "jsonl"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            # One thread, like the pod's cpu: 1: two runs each spinning 2 threads on 2 cores crawl.
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_trainer_pod_deleted_mid_epoch_resumes_and_matches_an_uninterrupted_run(operator_env, jobs, e2e_report):
    env, name = operator_env, "preempted"
    assert env.output_pvc, "needs the output PVC: a checkpoint on an emptyDir dies with the pod"
    body = tiny_job(name, LONGER)
    with tempfile.TemporaryDirectory() as tmp:
        reference = _reference_run(body, Path(tmp))
        jobs.create(body)

        def second_epoch_saved():
            status = jobs.status(name)
            return status if (status.get("lastCheckpoint") or {}).get("epoch", 0) >= 2 else None

        # An epoch's end is written to status at once (the step pushes in between are throttled):
        # a moment later the trainer is inside epoch 3 of 4, which takes several seconds here.
        at = wait_until(second_epoch_saved, TRAIN_TIMEOUT, f"{name} to checkpoint epoch 2", interval=0.1,
                        give_up=env.forbidden)
        time.sleep(1.5)
        (pod,) = [p for p in jobs.pods(jobs.get(name)) if p.status.phase == "Running"]
        jobs.core.delete_namespaced_pod(pod.metadata.name, jobs.ns)  # the pod's grace period: SIGTERM first
        checkpoints = []

        def finished():
            status = jobs.status(name)
            if status.get("lastCheckpoint") and status["lastCheckpoint"] not in checkpoints:
                checkpoints.append(status["lastCheckpoint"])
            return status if status.get("phase") in TERMINAL else None

        status = wait_until(finished, TRAIN_TIMEOUT, f"{name} to finish after its pod was deleted",
                            give_up=env.forbidden)
        _, err = reference.communicate(timeout=TRAIN_TIMEOUT)
        assert reference.returncode == 0, f"the reference run failed: {err[-2000:]}"
        expected = json.loads((Path(tmp) / "out" / "model.json").read_text())

    assert status["phase"] == "Succeeded", status
    assert status.get("resumeCount", 0) >= 1, f"no resume recorded: {status}"
    stepped = [c for c in checkpoints if c.get("step")]
    assert stepped, f"no mid-epoch checkpoint seen in status.lastCheckpoint: {checkpoints}"
    k8s_job = jobs.batch.read_namespaced_job(status["jobName"], jobs.ns)
    # Exit 75 (checkpointed) matches the podFailurePolicy Ignore rule: the backoff budget is untouched.
    assert (k8s_job.status.failed or 0) == 0, f"the preempted attempt counted as a failure: {k8s_job.status}"
    got, want = float(status["output"]["valAccuracy"]), float(expected["metrics"]["valAccuracy"])
    assert abs(got - want) <= 0.01, f"resumed run {got:.4f} vs uninterrupted {want:.4f}"
    e2e_report(f"trainer pod deleted 1.5 s after {at['lastCheckpoint']['file']}: checkpoint "
               f"{stepped[0]['file']}, resumeCount {status['resumeCount']}, attempts {status.get('attempts')} "
               f"(Job failed count {k8s_job.status.failed or 0}: not against backoffLimit), accuracy {got:.4f} vs "
               f"uninterrupted {want:.4f}")


# ---------------------------------------------------------------- 3. operator killed five times


def test_operator_killed_five_times_during_a_run_creates_exactly_one_job(operator_env, jobs, e2e_report):
    env, name = operator_env, "chaos"
    body = tiny_job(name, {**LONGER, "training": {**LONGER["training"], "epochs": 6}})
    watcher = JobWatch(env.api, jobs.ns)
    watcher.start()
    assert watcher.ready.wait(30)
    killed: set[str] = set()
    created = jobs.create(body)
    kills = [("right after create", kill_operator(env, killed))]
    for i in range(4):
        # A new pod, killed as soon as it runs (mid-startup, mid-reconcile) or a moment later.
        time.sleep([0.0, 1.5, 0.5, 3.0][i])
        phase = jobs.status(name).get("phase")
        assert phase not in TERMINAL, f"{name} ended ({phase}) before kill {i + 2}: make the job longer"
        kills.append((f"phase {phase}", kill_operator(env, killed)))
    status = env.wait_phase(jobs, name, ("Succeeded",), TRAIN_TIMEOUT * 2)["status"]
    time.sleep(1)  # the watch's last events
    watcher.stop()

    owned = watcher.owned_by(created["metadata"]["uid"])  # (watch errors, each resumed: watcher.errors)
    assert len(owned) == 1, f"Jobs created for {name} across {len(kills)} operator kills: {owned}"
    counts = jobs.event_counts(name, created["metadata"]["uid"])
    # Events are best effort: a kill between creating the Job and posting its event loses the event
    # (never the Job, never the status); what must not happen is a second one.
    assert counts.get(("Normal", "JobCreated"), 0) <= 1, f"JobCreated events: {counts}"
    assert (status.get("output") or {}).get("sha256"), f"output lost: {status}"
    progress = status.get("progress") or {}
    assert progress.get("epoch") == progress.get("totalEpochs") == 6, (
        f"final progress lost: {progress}\n{env.push_diagnosis(jobs, jobs.get(name))}")
    assert not [c for c in status.get("conditions") or [] if c["type"] == "Stalled" and c["status"] == "True"]
    e2e_report(f"operator killed {len(kills)}x (grace 0) during {name}: "
               + ", ".join(k for k, _ in kills) + f"; Jobs ever created: {len(owned)}; events "
               + json.dumps({r: n for (_, r), n in counts.items()}) + f"; attempts {status.get('attempts')}"
                                                                    + f"; Job watch reconnects {len(watcher.errors)}")


def test_no_operator_log_line_shows_a_traceback_from_the_corpus(operator_env):
    """The operator logs bad specs as one-line reasons, never as an unhandled exception."""
    log = operator_env.operator_log(max_bytes=200_000)
    tracebacks = [m.start() for m in re.finditer(r"Traceback \(most recent call last\)", log)]
    assert not tracebacks, log[max(0, tracebacks[0] - 500): tracebacks[0] + 2000] if tracebacks else ""


def test_operator_was_never_refused_by_rbac_through_the_faults(operator_env):
    """Runs last: the faults above made the operator do nothing the chart's RBAC does not allow."""
    problem = operator_env.forbidden()
    assert problem is None, problem
