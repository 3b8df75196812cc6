"""spec.distillation.teacher.fromJob on a cluster: resolving the teacher FineTuneJob, mounting its export, and
the student's status while it waits (teacher.py, the builders and one reconcile pass against a fake API)."""

from __future__ import annotations

import copy
import datetime as dt
import logging
from typing import Any

import pytest
import yaml
from test_operator_reconcile import FakeKube
from test_operator_status import STATUS_SCHEMA, assert_declared

from finetune_api.spec import load_job
from finetune_operator import admission, objects, teacher
from finetune_operator.parsed import FineTuneJob
from finetune_operator.reconcile import Runtime, reconcile
from finetune_operator.settings import Settings

pytestmark = pytest.mark.unit
NOW = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
LOG = logging.getLogger("test")
PVC = Settings(output_pvc="outputs")
SHA = "ab" * 32
STUDENT_SPEC = {"dataset": {"builtin": "digits"}, "distillation": {"teacher": {"fromJob": "big"}, "alpha": 0.7}}
SUCCEEDED = {"phase": "Succeeded", "reason": "Succeeded", "message": "training finished",
             "jobName": "big", "output": {"path": "/output", "volume": "finetune-output", "ephemeral": False,
                                          "weightsFile": "model.safetensors", "sha256": SHA, "valAccuracy": 0.9}}


def body(name: str, spec: dict[str, Any], status: dict[str, Any] | None = None, uid: str = "") -> dict[str, Any]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "ml", "uid": uid or f"uid-{name}", "generation": 1},
            "spec": spec, **({"status": status} if status else {})}


def student(spec: dict[str, Any] | None = None) -> FineTuneJob:
    return FineTuneJob.from_body(body("small", spec or STUDENT_SPEC))


def teacher_body(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return body("big", {"dataset": {"builtin": "digits"}, **spec}, status)


def resolve(status: dict[str, Any] | None = None, settings: Settings = PVC, **spec: Any) -> teacher.Resolution:
    return teacher.resolve(student(), teacher_body(status, **spec), settings)


# --- where the teacher's export is ---------------------------------------------------------------


def test_export_on_the_operators_output_pvc_is_the_teachers_folder_there() -> None:
    big = FineTuneJob.from_body(teacher_body())
    assert teacher.export_location(big, PVC) == ("outputs", "big")


@pytest.mark.parametrize(("mount", "out", "sub"), [("/output", "/output", ""), ("/models", "/models/big/v1", "big/v1")])
def test_export_on_a_user_pvc_is_the_output_path_inside_that_claim(mount: str, out: str, sub: str) -> None:
    vol = {"name": "models", "mountPath": mount, "persistentVolumeClaim": {"claimName": "shared"}}
    big = FineTuneJob.from_body(teacher_body(volumes=[vol], output={"path": out}))
    assert teacher.export_location(big, Settings()) == ("shared", sub)


def test_an_emptydir_teacher_output_is_refused_naming_the_volume() -> None:
    vol = {"name": "scratch", "mountPath": "/output", "emptyDir": {}}
    where = teacher.export_location(FineTuneJob.from_body(teacher_body(volumes=[vol])), PVC)
    assert isinstance(where, str) and "'scratch' (emptyDir)" in where and "persistentVolumeClaim" in where
    where = teacher.export_location(FineTuneJob.from_body(teacher_body()), Settings())  # no output PVC either
    assert isinstance(where, str) and "emptyDir" in where


# --- resolution ----------------------------------------------------------------------------------


def test_a_missing_teacher_fails_the_student_with_teacher_not_found() -> None:
    got = teacher.resolve(student(), None, PVC)
    assert (got.phase, got.reason, got.export) == ("Failed", "TeacherNotFound", None)
    assert "big" in got.message and "namespace ml" in got.message


@pytest.mark.parametrize("phase", [None, "Pending", "Running", "Suspended"])
def test_an_unfinished_teacher_makes_the_student_wait(phase: str | None) -> None:
    got = resolve({"phase": phase, "reason": "Running"} if phase else None)
    assert (got.phase, got.reason, got.export) == ("Pending", "WaitingForTeacher", None)
    assert "waiting for teacher FineTuneJob big" in got.message


def test_a_failed_teacher_fails_the_student_naming_the_teacher_and_its_reason() -> None:
    got = resolve({"phase": "Failed", "reason": "OOMKilled", "message": "out of memory"})
    assert (got.phase, got.reason) == ("Failed", "TeacherFailed")
    assert "teacher FineTuneJob big failed (OOMKilled: out of memory)" in got.message


def test_a_succeeded_teacher_gives_its_export_with_digest() -> None:
    got = resolve(SUCCEEDED)
    assert got.export is not None and (got.export.claim, got.export.sub_path) == ("outputs", "big")
    shown = got.status()
    assert shown["job"] == "big" and shown["sha256"] == SHA and shown["path"] == objects.TEACHER_DIR
    assert shown["valAccuracy"] == 0.9 and shown["claim"] == "outputs" and shown["subPath"] == "big"


def test_an_unmountable_teacher_is_refused_before_it_even_finishes() -> None:
    got = resolve({"phase": "Running"}, settings=Settings())
    assert (got.phase, got.reason) == ("Failed", "TeacherNotMountable") and "emptyDir" in got.message
    gone = resolve({**SUCCEEDED, "output": {**SUCCEEDED["output"], "ephemeral": True}})
    assert gone.reason == "TeacherNotMountable" and "ephemeral" in gone.message


def test_a_teacher_learning_from_its_student_is_a_cycle() -> None:
    got = resolve({"phase": "Pending"}, distillation={"teacher": {"fromJob": "small"}})
    assert (got.phase, got.reason) == ("Failed", "InvalidSpec") and "cycle" in got.message


def test_from_job_must_be_a_finetunejob_name_on_a_cluster_and_not_the_job_itself() -> None:
    path = student({**STUDENT_SPEC, "distillation": {"teacher": {"fromJob": "/exports/big"}}})
    problem = admission.spec_problem(path, Settings())
    assert problem and problem.startswith("spec.distillation.teacher.fromJob:") and "\n" not in problem
    own = student({**STUDENT_SPEC, "distillation": {"teacher": {"fromJob": "small"}}})
    assert "its own teacher" in (admission.spec_problem(own, Settings()) or "")
    assert admission.spec_problem(student(), Settings()) is None
    assert admission.spec_problem(student({**STUDENT_SPEC, "distillation": {"teacher": {"fromJob": "a.b-1"}}}),
                                  Settings()) is None


# --- the student's pod and job file ----------------------------------------------------------------


def _pod(job: dict[str, Any]) -> tuple[dict[str, dict], dict[str, dict]]:
    pod = job["spec"]["template"]["spec"]
    return {v["name"]: v for v in pod["volumes"]}, {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}


def test_the_students_pod_mounts_the_teachers_claim_read_only_at_the_teacher_folder() -> None:
    export = teacher.TeacherExport("big", "models", "big/v1", SUCCEEDED["output"])
    volumes, mounts = _pod(objects.build_job(student(), Settings(), export))
    assert volumes[objects.VOL_TEACHER]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert mounts[objects.TEACHER_DIR] == {"name": objects.VOL_TEACHER, "mountPath": objects.TEACHER_DIR,
                                           "readOnly": True, "subPath": "big/v1"}
    plain_volumes, _ = _pod(objects.build_job(student(), Settings()))
    assert objects.VOL_TEACHER not in plain_volumes


def test_a_claim_the_student_already_mounts_is_mounted_once_more_read_only_not_twice() -> None:
    export = teacher.TeacherExport("big", "outputs", "big", SUCCEEDED["output"])
    volumes, mounts = _pod(objects.build_job(student(), PVC, export))  # both on the operator's output PVC
    assert objects.VOL_TEACHER not in volumes
    assert mounts[objects.TEACHER_DIR] == {"name": objects.VOL_OUTPUT, "mountPath": objects.TEACHER_DIR,
                                           "readOnly": True, "subPath": "big"}
    assert mounts["/output"]["subPath"] == "small" and not mounts["/output"].get("readOnly")


def test_the_job_file_names_the_mounted_export_as_from_job(tmp_path: Any) -> None:
    export = teacher.TeacherExport("big", "outputs", "big")
    text = objects.build_configmap(student(), export)["data"]["job.yaml"]
    path = tmp_path / "job.yaml"
    path.write_text(text)
    spec = load_job(path).spec  # what the trainer reads
    assert spec.distillation.teacher.from_job == objects.TEACHER_DIR and spec.distillation.alpha == 0.7
    assert "big" not in yaml.safe_load(text)["spec"]["distillation"]["teacher"]["fromJob"]


def test_user_volumes_cannot_take_the_teacher_folder() -> None:
    vol = {"name": "x", "mountPath": objects.TEACHER_DIR, "emptyDir": {}}
    problem = admission.spec_problem(student({**STUDENT_SPEC, "volumes": [vol]}), Settings())
    assert problem and "spec.volumes[0].mountPath" in problem


# --- one reconcile pass against a fake API -------------------------------------------------------------

FTJS = "/apis/finetune.dev/v1alpha1/namespaces/ml/finetunejobs"
STUDENT_JOB = "/apis/batch/v1/namespaces/ml/jobs/small"


def cluster(teacher_status: dict[str, Any] | None, with_teacher: bool = True) -> tuple[Runtime, FakeKube]:
    kube = FakeKube()
    kube.objects[f"{FTJS}/small"] = body("small", copy.deepcopy(STUDENT_SPEC))
    if with_teacher:
        kube.objects[f"{FTJS}/big"] = teacher_body(copy.deepcopy(teacher_status))
    return Runtime(settings=PVC, kube=kube, clock=lambda: NOW), kube  # type: ignore[arg-type]


def test_the_student_waits_without_a_job_then_starts_once_the_teacher_succeeded() -> None:
    rt, kube = cluster({"phase": "Running", "reason": "Running"})
    waiting = reconcile(rt, "ml", "small", LOG).status
    assert (waiting["phase"], waiting["reason"]) == ("Pending", "WaitingForTeacher")
    assert waiting["distillation"] == {"teacher": {"job": "big", "phase": "Running"}}
    assert STUDENT_JOB not in kube.objects and ("Normal", "WaitingForTeacher") in kube.events()
    assert rt.dependents.students("ml", "big") == ["small"] and rt.queue.unfinished() == [("ml", "small")]
    assert_declared(waiting, STATUS_SCHEMA)

    kube.objects[f"{FTJS}/big"]["status"] = copy.deepcopy(SUCCEEDED)  # the watch re-runs the student's pass
    started = reconcile(rt, "ml", "small", LOG).status
    assert started["jobName"] == "small" and STUDENT_JOB in kube.objects
    assert started["distillation"]["teacher"]["sha256"] == SHA
    assert kube.objects[f"{FTJS}/small"]["status"]["distillation"]["teacher"]["path"] == objects.TEACHER_DIR
    assert started["distillation"]["teacher"]["phase"] == "Succeeded"
    assert rt.dependents.students("ml", "big") == []
    assert_declared(started, STATUS_SCHEMA)
    configmap = kube.objects["/api/v1/namespaces/ml/configmaps/small-spec"]
    assert f"fromJob: {objects.TEACHER_DIR}" in configmap["data"]["job.yaml"]

    kube.objects[f"{FTJS}/big"]["status"] = {"phase": "Failed", "reason": "JobDeleted"}  # too late to matter
    later = reconcile(rt, "ml", "small", LOG).status
    assert later["distillation"]["teacher"]["sha256"] == SHA and later["phase"] == "Pending"


def test_teacher_not_found_is_rejudged_when_the_teacher_appears() -> None:
    rt, kube = cluster(None, with_teacher=False)
    failed = reconcile(rt, "ml", "small", LOG).status
    assert (failed["phase"], failed["reason"]) == ("Failed", "TeacherNotFound") and failed["completionTime"]
    assert ("Warning", "TeacherNotFound") in kube.events() and rt.queue.unfinished() == []
    assert rt.dependents.students("ml", "big") == ["small"]  # the teacher's ADDED event re-runs it
    assert_declared(failed, STATUS_SCHEMA)

    kube.objects[f"{FTJS}/big"] = teacher_body({"phase": "Pending", "reason": "Creating"})
    waiting = reconcile(rt, "ml", "small", LOG).status
    assert (waiting["phase"], waiting["reason"]) == ("Pending", "WaitingForTeacher")
    assert "completionTime" not in waiting and kube.objects[f"{FTJS}/small"]["status"]["completionTime"] is None


def test_a_failed_teacher_fails_the_waiting_student_and_creates_nothing() -> None:
    rt, kube = cluster({"phase": "Failed", "reason": "InvalidJobFile", "message": "no such folder"})
    failed = reconcile(rt, "ml", "small", LOG).status
    assert (failed["phase"], failed["reason"]) == ("Failed", "TeacherFailed") and "big" in failed["message"]
    assert {c["type"] for c in failed["conditions"] if c["status"] == "True"} == {"Stalled", "Failed"}
    assert STUDENT_JOB not in kube.objects and ("Warning", "TeacherFailed") in kube.events()


def test_dependents_follow_students_and_forget_deleted_ones() -> None:
    deps = teacher.Dependents()
    deps.wait("ml", "big", "a")
    deps.wait("ml", "big", "b")
    deps.wait("ml", "other", "a")  # a student has one teacher: its newest
    deps.wait("ns2", "big", "a")
    assert deps.students("ml", "big") == ["b"] and deps.students("ml", "other") == ["a"]
    deps.done("ml", "b")
    assert deps.students("ml", "big") == [] and deps.students("ns2", "big") == ["a"]
