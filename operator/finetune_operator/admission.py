"""Admission: whether the operator can run a FineTuneJob at all, checked before anything is created.

The spec model (finetune_api.spec) decides what a valid spec is; this adds what it accepts but a cluster
run cannot do (reserved volume names and mount points, hostPath when the operator forbids it, hostnames of
multi-worker pods, a teacher fromJob that is no FineTuneJob name). Every problem names its field, since it
ends up in status.message and an Event.
"""

from __future__ import annotations

import posixpath

from finetune_api.spec import FineTuneJobSpec
from finetune_operator.naming import DNS_LABEL, DNS_SUBDOMAIN, MAX_HOSTNAME, MAX_NAME, job_name
from finetune_operator.objects import RESERVED_MOUNTS, RESERVED_VOLUMES, output_volume, within
from finetune_operator.parsed import FineTuneJob
from finetune_operator.settings import Settings


def spec_problem(ftj: FineTuneJob, settings: Settings) -> str | None:
    """Why this FineTuneJob cannot run (the model's message, else the cluster problems), or None."""
    if ftj.spec is None:
        return ftj.error
    problems = cluster_problems(ftj.spec, settings, ftj.name)
    return "; ".join(problems) if problems else None


def cluster_problems(spec: FineTuneJobSpec, settings: Settings, name: str | None = None) -> list[str]:
    """What the model accepts but this operator cannot run; each names the field.

    `name`: the FineTuneJob's metadata.name, which multi-worker jobs turn into pod hostnames.
    """
    problems = _worker_problems(spec, name)
    mounts = []
    for i, vol in enumerate(spec.volumes):
        where = f"spec.volumes[{i}]"
        if vol.name in RESERVED_VOLUMES:
            problems.append(f"{where}.name: {vol.name!r} is reserved by the operator")
        mount = posixpath.normpath(vol.mount_path)
        if _overlaps_reserved(mount):
            problems.append(f"{where}.mountPath: {vol.mount_path} overlaps {', '.join(RESERVED_MOUNTS)}")
        if mount in mounts:
            problems.append(f"{where}.mountPath: {vol.mount_path} is mounted twice")
        mounts.append(mount)
        if vol.host_path is not None and not settings.allow_host_path:
            problems.append(f"{where}.hostPath: hostPath volumes are disabled by the operator's settings")
    return problems + _output_problems(spec) + _teacher_problems(spec, name)


def _teacher_problems(spec: FineTuneJobSpec, name: str | None) -> list[str]:
    """On a cluster, teacher.fromJob names a FineTuneJob of the namespace (a path is for local runs)."""
    teacher = spec.distillation.teacher.from_job if spec.distillation is not None else None
    if teacher is None:
        return []
    where = "spec.distillation.teacher.fromJob"
    if len(teacher) > MAX_NAME or not DNS_SUBDOMAIN.match(teacher):
        return [f"{where}: on a cluster this is the name of a FineTuneJob in the same namespace (lowercase "
                f"letters, digits, '-' and '.'); got {teacher!r} (a path is for local runs)"]
    if teacher == name:
        return [f"{where}: a FineTuneJob cannot be its own teacher"]
    return []


def _worker_problems(spec: FineTuneJobSpec, name: str | None) -> list[str]:
    """Multi-worker pods are named <job>-<index> by the Job controller and found as <job>-0.<service>:
    the name must make valid hostnames (a DNS label) for every index."""
    if spec.workers == 1 or name is None:
        return []
    job = job_name(name)
    longest = MAX_HOSTNAME - len(f"-{spec.workers - 1}")
    if DNS_LABEL.match(job) and len(job) <= longest:
        return []
    return [f"spec.workers: a FineTuneJob with {spec.workers} workers needs a name without dots of at most "
            f"{longest} characters (its pods' hostnames are <name>-<index>); got {name!r}"]


def _output_problems(spec: FineTuneJobSpec) -> list[str]:
    """The output path becomes a mount of its own unless a user volume holds it."""
    out = spec.output.path
    if not out.startswith("/"):
        return [f"spec.output.path: {out!r} must be absolute in a cluster (relative paths are for local runs)"]
    holder = output_volume(spec)
    if holder is not None and holder.read_only:
        return [f"spec.output.path: {out} is on read-only volume {holder.name!r}"]
    mount = posixpath.normpath(out)
    if holder is None and _overlaps_reserved(mount):
        return [f"spec.output.path: {out} overlaps {', '.join(RESERVED_MOUNTS)}"]
    return []


def _overlaps_reserved(mount: str) -> bool:
    """A mount at, above or below one of the operator's own mount points."""
    return any(within(mount, r) or within(r, mount) for r in RESERVED_MOUNTS)
