"""Knowledge distillation from another FineTuneJob (issue 17): spec.distillation.teacher.fromJob on a cluster.

The student creates nothing while its teacher trains (Pending, WaitingForTeacher), starts once the teacher
has Succeeded, with the teacher's export mounted read-only from the operator's output PVC, and Succeeds
having distilled it (the real trainer runs in both pods). A failed teacher fails its student
(TeacherFailed); a missing one too (TeacherNotFound) — until it appears: the operator's FineTuneJob watch
re-checks the students of a teacher that changes.
"""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.e2e

kubernetes = pytest.importorskip("kubernetes")
from operator_env import TRAIN_TIMEOUT, wait_until  # noqa: E402
from operator_util import tiny_job  # noqa: E402

TEACHER_DIR = "/var/run/finetune/teacher"  # where the operator mounts the export in the student's pod


def student_of(name: str, teacher: str, **spec) -> dict:
    """The tiny job (2 digit classes: the teacher's), distilling `teacher` with soft targets."""
    return tiny_job(name, {"distillation": {"teacher": {"fromJob": teacher}, "type": "soft", "alpha": 0.5,
                                            "temperature": 2.0}, **spec})


def _reason(jobs, name: str, reason: str):
    status = jobs.status(name)
    return status if status.get("reason") == reason else None


def test_student_waits_for_its_teacher_then_succeeds_distilling_its_export(operator_env, jobs, e2e_report):
    env, teacher, student = operator_env, "distil-teacher", "distil-student"
    t0 = time.monotonic()
    jobs.create(tiny_job(teacher))
    created = jobs.create(student_of(student, teacher, training={"epochs": 1}))

    waiting = wait_until(lambda: _reason(jobs, student, "WaitingForTeacher"), 30,
                         f"{student} to wait for {teacher} (reason WaitingForTeacher)", give_up=env.forbidden)
    assert waiting["phase"] == "Pending" and teacher in waiting["message"], waiting
    assert (waiting.get("distillation") or {}).get("teacher", {}).get("job") == teacher, waiting
    assert jobs.status(teacher).get("phase") != "Succeeded", "the teacher finished first: the test proves nothing"
    assert not jobs.owned(created)["Job"] and not jobs.pods(created), "the student started before its teacher"
    wait_until(lambda: jobs.event_counts(student).get(("Normal", "WaitingForTeacher")), 15,
               f"a WaitingForTeacher event on {student}: {jobs.event_counts(student)}")

    done_teacher = env.wait_phase(jobs, teacher, ("Succeeded",), TRAIN_TIMEOUT)["status"]
    done = env.wait_phase(jobs, student, ("Succeeded",), TRAIN_TIMEOUT)["status"]
    took = time.monotonic() - t0
    sha = done_teacher["output"]["sha256"]
    shown = (done.get("distillation") or {}).get("teacher") or {}
    assert shown.get("job") == teacher and shown.get("sha256") == sha and shown.get("path") == TEACHER_DIR, shown
    assert done["startTime"] >= done_teacher["completionTime"], (done["startTime"], done_teacher["completionTime"])

    pod = jobs.batch.read_namespaced_job(done["jobName"], jobs.ns).spec.template.spec
    mount = next(m for m in pod.containers[0].volume_mounts if m.mount_path == TEACHER_DIR)
    assert mount.read_only is True and mount.sub_path == teacher, mount
    pvc = env.pvc_dir(env.output_pvc) if env.output_pvc else None
    if pvc is not None:  # the student's export says whom it learnt from
        folder = pvc / student
        doc = json.loads((folder / "model.json").read_text())
        assert "distillation" in doc, f"the student's model.json has no distillation section: {sorted(doc)}"
        assert sha in json.dumps(doc["distillation"]), f"the teacher's digest is not in it: {doc['distillation']}"
    e2e_report(f"distillation: {teacher} then {student} (soft, fromJob mounted read-only) Succeeded in {took:.0f} s; "
               f"teacher val acc {done_teacher['output'].get('valAccuracy')}, "
               f"student {(done.get('output') or {}).get('valAccuracy')}")


def test_student_of_a_failed_teacher_fails_with_teacher_failed(operator_env, jobs):
    env, teacher, student = operator_env, "failing-teacher", "orphan-student"
    jobs.create(tiny_job(teacher, {  # fails in its trainer: no such folder (exit 2, InvalidJobFile)
        "dataset": {"builtin": None, "path": "/data/does-not-exist", "classes": None},
        "volumes": [{"name": "data", "mountPath": "/data", "emptyDir": {}}],
    }))
    created = jobs.create(student_of(student, teacher))
    failed = env.wait_phase(jobs, student, ("Failed",), TRAIN_TIMEOUT)["status"]
    assert failed["reason"] == "TeacherFailed", failed
    assert f"teacher FineTuneJob {teacher} failed (InvalidJobFile" in failed["message"], failed
    assert not failed.get("jobName") and not jobs.owned(created)["Job"], failed
    wait_until(lambda: jobs.event_counts(student).get(("Warning", "TeacherFailed")), 15,
               f"a Warning event TeacherFailed on {student}: {jobs.event_counts(student)}")


def test_a_missing_teacher_fails_with_teacher_not_found_until_it_appears(operator_env, jobs):
    env, teacher, student = operator_env, "late-teacher", "early-student"
    created = jobs.create(student_of(student, teacher))
    failed = env.wait_phase(jobs, student, ("Failed",), 30)["status"]
    assert failed["reason"] == "TeacherNotFound" and teacher in failed["message"], failed
    assert not jobs.owned(created)["Job"], failed
    # The teacher appears (invalid: it fails at once, no pod to wait for): the watch re-checks the student.
    jobs.create(tiny_job(teacher, {"volumes": [{"name": "finetune-tmp", "mountPath": "/data", "emptyDir": {}}]}))
    env.wait_phase(jobs, teacher, ("Failed",), 30)
    again = wait_until(lambda: _reason(jobs, student, "TeacherFailed"), 30,
                       f"{student} to notice its teacher appeared and failed", give_up=env.forbidden)
    assert "InvalidSpec" in again["message"], again
