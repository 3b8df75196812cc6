"""spec.distillation.teacher.fromJob on a cluster: the teacher FineTuneJob, resolved before the student starts.

A student whose teacher is another FineTuneJob creates nothing until that teacher has Succeeded with an
export on a PersistentVolumeClaim; then its pod mounts the export read-only at TEACHER_DIR and its job file
names that folder as fromJob (what the trainer reads in a local run too). Everything here is pure: the
reconcile pass GETs the teacher and hands it to `resolve`; `Dependents` tells the FineTuneJob watch which
waiting students to re-check when a teacher changes.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_api.status import Phase, Reason
from finetune_operator import observe
from finetune_operator.objects import TEACHER_DIR, VOL_OUTPUT, VOL_TEACHER, output_volume
from finetune_operator.parsed import FineTuneJob, Obj, ObjView
from finetune_operator.settings import Settings
from finetune_operator.status import conditions


@dataclass(frozen=True)
class TeacherExport:
    """A Succeeded teacher's export: the claim and folder it is in, and what its status says about it."""

    job: str
    claim: str
    sub_path: str  # "" when the export is the claim's root
    output: Mapping[str, Any] = field(default_factory=dict)  # the teacher's status.output

    def pod_mount(self, volumes: list[Obj]) -> tuple[Obj | None, Obj]:
        """The student pod's volume for the claim (None when one of its volumes already is that claim: a
        second volume of one claim is refused by some CSI drivers) and the read-only mount at TEACHER_DIR."""
        same = next((v["name"] for v in volumes
                     if (v.get("persistentVolumeClaim") or {}).get("claimName") == self.claim), None)
        mount: Obj = {"name": same or VOL_TEACHER, "mountPath": TEACHER_DIR, "readOnly": True}
        if self.sub_path:
            mount["subPath"] = self.sub_path
        volume = None if same else {"name": VOL_TEACHER,
                                    "persistentVolumeClaim": {"claimName": self.claim, "readOnly": True}}
        return volume, mount

    def status(self) -> dict[str, Any]:
        """status.distillation.teacher of the student."""
        out = self.output
        entry = {"job": self.job, "phase": Phase.SUCCEEDED.value, "path": TEACHER_DIR, "claim": self.claim,
                 "subPath": self.sub_path or None, "weightsFile": out.get("weightsFile"),
                 "sha256": out.get("sha256"), "valAccuracy": out.get("valAccuracy")}
        return {k: v for k, v in entry.items() if v is not None}


@dataclass(frozen=True)
class Resolution:
    """Either the export to mount, or why the student does not start (Pending: waits; Failed: gives up)."""

    teacher: str
    export: TeacherExport | None = None
    phase: str = Phase.PENDING.value
    reason: str = Reason.WAITING_FOR_TEACHER.value
    message: str = ""
    teacher_phase: str | None = None

    def status(self) -> dict[str, Any]:
        if self.export is not None:
            return self.export.status()
        return {"job": self.teacher, **({"phase": self.teacher_phase} if self.teacher_phase else {})}


def teacher_name(ftj: FineTuneJob) -> str | None:
    """The teacher FineTuneJob's name, when the (valid) spec distils from one."""
    distillation = ftj.spec.distillation if ftj.spec is not None else None
    return distillation.teacher.from_job if distillation is not None else None


def export_location(teacher: FineTuneJob, settings: Settings) -> tuple[str, str] | str:
    """(claim, folder inside it) of the teacher's spec.output.path, or why another pod cannot mount it.

    The output is either on one of the teacher's volumes (the deepest holding spec.output.path) or, when
    none holds it, on the operator's output PVC under the teacher's name (objects._volumes).
    """
    spec = teacher.valid_spec()
    holder = output_volume(spec)
    if holder is None:
        if settings.output_pvc:
            return settings.output_pvc, teacher.name
        return (f"teacher FineTuneJob {teacher.name} writes its model to an emptyDir ({VOL_OUTPUT}), deleted with "
                "its pod: put its spec.output.path on a persistentVolumeClaim volume (or give the operator an "
                "output PVC) and train it again")
    claim = (holder.persistent_volume_claim or {}).get("claimName")
    if not claim:
        kind = next(k for k in holder.source() if k != "name")
        return (f"teacher FineTuneJob {teacher.name} writes its model to volume {holder.name!r} ({kind}), which "
                "the student's pod cannot mount: put its spec.output.path on a persistentVolumeClaim volume")
    inside = posixpath.relpath(posixpath.normpath(spec.output.path), posixpath.normpath(holder.mount_path))
    return claim, "" if inside == "." else inside


def resolve(student: FineTuneJob, body: ObjView | None, settings: Settings) -> Resolution:
    """What the teacher named by the student's fromJob allows: start with its export, wait, or fail."""
    name = teacher_name(student)
    assert name is not None, "resolve is for students with a teacher FineTuneJob"
    where = f"spec.distillation.teacher.fromJob: teacher FineTuneJob {name}"
    if body is None:
        return Resolution(name, phase=Phase.FAILED, reason=Reason.TEACHER_NOT_FOUND,
                          message=f"{where} does not exist in namespace {student.namespace} (this job starts "
                          "once it is created and has succeeded)")
    teacher = FineTuneJob.from_body(body)
    state = teacher.status
    phase = state.get("phase") or Phase.PENDING.value
    if phase == Phase.FAILED:
        return Resolution(name, phase=Phase.FAILED, reason=Reason.TEACHER_FAILED, teacher_phase=phase,
                          message=f"{where} failed ({state.get('reason') or 'Failed'}: {state.get('message', '')})")
    if teacher.spec is None:  # its own pass fails it (InvalidSpec); TeacherFailed follows
        return _waiting(name, phase, "its spec is being checked")
    if teacher_name(teacher) == student.name:
        return Resolution(name, phase=Phase.FAILED, reason=Reason.INVALID_SPEC, teacher_phase=phase,
                          message=f"{where} learns from this job in turn: a cycle that never starts")
    location = export_location(teacher, settings)
    if isinstance(location, str):
        return Resolution(name, phase=Phase.FAILED, reason=Reason.TEACHER_NOT_MOUNTABLE, teacher_phase=phase,
                          message=f"spec.distillation.teacher.fromJob: {location}")
    output = state.get("output") or {}
    if phase != Phase.SUCCEEDED:
        return _waiting(name, phase, state.get("reason") or phase)
    if output.get("ephemeral"):
        return Resolution(name, phase=Phase.FAILED, reason=Reason.TEACHER_NOT_MOUNTABLE, teacher_phase=phase,
                          message=f"{where} succeeded with its model on an emptyDir (status.output.ephemeral): it is "
                          "gone; train it again with spec.output.path on a persistentVolumeClaim")
    claim, sub_path = location
    return Resolution(name, export=TeacherExport(name, claim, sub_path, dict(output)), phase=Phase.PENDING,
                      reason=Reason.CREATING, teacher_phase=phase)


def _waiting(name: str, phase: str, why: str) -> Resolution:
    return Resolution(name, teacher_phase=phase,
                      message=f"waiting for teacher FineTuneJob {name} to succeed (now {phase}: {why}); "
                      "no pod runs until then")


def not_started_status(ftj: FineTuneJob, resolution: Resolution, now: dt.datetime) -> dict[str, Any]:
    """The student's status while it waits for, or gave up on, its teacher (nothing is created)."""
    prev = dict(ftj.status)
    failed_at = (prev.get("completionTime") if prev.get("phase") == Phase.FAILED else None) or observe.format_time(now)
    status: dict[str, Any] = {
        "phase": resolution.phase,
        "reason": resolution.reason,
        "message": resolution.message,
        "observedGeneration": ftj.generation,
        "completionTime": failed_at if resolution.phase == Phase.FAILED else None,
        "distillation": {"teacher": resolution.status()},
    }
    status["conditions"] = conditions(prev, status, None, None, now)
    return {k: v for k, v in status.items() if v is not None}


@dataclass
class Dependents:
    """Which students wait on which teacher: (namespace, teacher) -> student names.

    Filled by the passes that find a student not started (after an operator restart, kopf's resume
    handler runs every FineTuneJob's pass, so it fills again); a student leaves it when its Job exists
    or it is deleted. The FineTuneJob watch reads it: a teacher's event re-runs its students' passes.
    """

    _guard: threading.Lock = field(default_factory=threading.Lock)
    _students: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def wait(self, namespace: str, teacher: str, student: str) -> None:
        with self._guard:
            self._drop(namespace, student)
            self._students.setdefault((namespace, teacher), set()).add(student)

    def done(self, namespace: str, student: str) -> None:
        with self._guard:
            self._drop(namespace, student)

    def students(self, namespace: str, teacher: str) -> list[str]:
        with self._guard:
            return sorted(self._students.get((namespace, teacher), ()))

    def _drop(self, namespace: str, student: str) -> None:
        for key in [k for k, names in self._students.items() if k[0] == namespace and student in names]:
            self._students[key].discard(student)
            if not self._students[key]:
                del self._students[key]
