"""Pure builders: a parsed FineTuneJob → the ConfigMap, token Secret and batch/v1 Job for it (plus, for
spec.workers > 1, the headless Service its worker pods find each other through).

No API calls here; handlers add the ownerReference and create what is missing. The same FineTuneJob
always yields the same objects (names, labels, args), so a restarted operator recognises what it created.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Any

import yaml

from finetune_api.errors import EXIT_INVALID_JOB, EXIT_PREEMPTED
from finetune_api.spec import API_GROUP, API_VERSION, KIND, FineTuneJobSpec, Volume
from finetune_operator.drift import digest_annotation
from finetune_operator.fetch import FETCH_CONTAINER, fetch_init_container
from finetune_operator.naming import (
    ANNOTATION_NAME,
    child_metadata,
    common_labels,
    configmap_name,
    job_name,
    master_address,
    selector_labels,
    service_name,
    token_secret_name,
)
from finetune_operator.parsed import FineTuneJob, Obj
from finetune_operator.settings import Settings

if TYPE_CHECKING:
    from finetune_operator.teacher import TeacherExport

CONTAINER = "trainer"
JOB_FILE_DIR = "/etc/finetune"
JOB_FILE = f"{JOB_FILE_DIR}/job.yaml"
TMP_DIR = "/tmp"
SHM_DIR = "/dev/shm"
# Our own pod volumes; user volumes must not take these names.
VOL_JOB_FILE = "finetune-job"
VOL_TMP = "finetune-tmp"
VOL_SHM = "finetune-shm"
VOL_OUTPUT = "finetune-output"
VOL_PROGRESS = "finetune-progress"
# The per-job progress token (a Secret owned by the FineTuneJob), read by the trainer's HTTP reporter.
PROGRESS_DIR = "/var/run/finetune/progress"
PROGRESS_TOKEN_FILE = f"{PROGRESS_DIR}/token"
# spec.distillation.teacher.fromJob: the teacher FineTuneJob's export, mounted read-only from its PVC.
VOL_TEACHER = "finetune-teacher"
VOL_FEATURE_CACHE = "finetune-feature-cache"  # training.featureCacheDir outside every other mount
TEACHER_DIR = "/var/run/finetune/teacher"
RESERVED_VOLUMES = (VOL_JOB_FILE, VOL_TMP, VOL_SHM, VOL_OUTPUT, VOL_PROGRESS, VOL_TEACHER, VOL_FEATURE_CACHE)
RESERVED_MOUNTS = (JOB_FILE_DIR, TMP_DIR, SHM_DIR, PROGRESS_DIR, TEACHER_DIR)
# Multi-worker jobs: torchrun's static rendezvous on worker 0, reached as <job>-0.<service>.
RENDEZVOUS_PORT = 29500


def resolved_job_file(ftj: FineTuneJob, teacher: TeacherExport | None = None) -> str:
    """The job file the trainer reads: the validated spec with every default filled in.

    With a teacher FineTuneJob, distillation.teacher.fromJob becomes the folder its export is mounted at:
    the trainer reads fromJob as an export folder, the same as in a local run.
    """
    spec = ftj.valid_spec().to_wire()
    if teacher is not None:
        spec["distillation"]["teacher"]["fromJob"] = TEACHER_DIR
    doc = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": ftj.name, "namespace": ftj.namespace},
        "spec": spec,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def build_configmap(ftj: FineTuneJob, teacher: TeacherExport | None = None) -> Obj:
    """The ConfigMap holding the resolved job file (mounted read-only at /etc/finetune)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(ftj, configmap_name(ftj.name)),
        "data": {"job.yaml": resolved_job_file(ftj, teacher)},
    }


def within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def output_volume(spec: FineTuneJobSpec) -> Volume | None:
    """The user volume whose mount holds spec.output.path (the deepest one), or None."""
    out = posixpath.normpath(spec.output.path)
    holders = [v for v in spec.volumes if within(out, posixpath.normpath(v.mount_path))]
    return max(holders, key=lambda v: len(v.mount_path), default=None)


def output_location(ftj: FineTuneJob, settings: Settings) -> dict[str, Any]:
    """Where the model ends up: a user volume, the operator's output PVC, or an emptyDir (`ephemeral`).

    Only the path when the spec does not validate: which volume would hold it is then unknown.
    """
    if ftj.spec is None:
        return {"path": ftj.output.path}
    path = ftj.spec.output.path
    holder = output_volume(ftj.spec)
    if holder is not None:
        return {"path": path, "volume": holder.name, "ephemeral": False}
    return {"path": path, "volume": VOL_OUTPUT, "ephemeral": not settings.output_pvc}


def pod_failure_policy(fetching: bool = False) -> Obj:
    """Don't retry what cannot succeed; don't count what was not the trainer's fault.

    Rules match in order: a disruption (preemption, eviction, node drain) is ignored
    whatever the exit code; exit 2 (invalid job file or data) fails the Job at once;
    exit 75 (checkpointed after SIGTERM) is ignored, so the retry resumes from it.
    """
    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_INVALID_JOB]},
            },
            {
                "action": "Ignore",
                "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_PREEMPTED]},
            },
            # With dataset.uri / weights.uri: the fetch init container's checksum mismatch, missing object or
            # refused credentials (exit 2) cannot succeed on a retry either.
            *([{"action": "FailJob", "onExitCodes": {"containerName": FETCH_CONTAINER, "operator": "In",
                                                     "values": [EXIT_INVALID_JOB]}}] if fetching else []),
        ]
    }


def build_job(ftj: FineTuneJob, settings: Settings, teacher: TeacherExport | None = None) -> Obj:
    """The batch/v1 Job running `finetune-train -f /etc/finetune/job.yaml` for this FineTuneJob."""
    spec = ftj.valid_spec()
    run = spec.run_policy
    job_spec: Obj = {
        "backoffLimit": run.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "suspend": run.suspend,
        "podFailurePolicy": pod_failure_policy(fetching=bool(spec.dataset.uri or spec.model.weights.uri)),
        "template": {
            "metadata": {"labels": common_labels(ftj), "annotations": {ANNOTATION_NAME: ftj.name}},
            "spec": pod_spec(ftj, settings, teacher),
        },
    }
    if spec.workers > 1:
        _make_indexed(job_spec, spec)
    if run.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = run.active_deadline_seconds
    if run.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = run.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": child_metadata(ftj, job_name(ftj.name), digest_annotation(ftj)),
        "spec": job_spec,
    }


def _make_indexed(job_spec: Obj, spec: FineTuneJobSpec) -> None:
    """One Job, N indexed pods that fail and succeed as a group.

    - completions = parallelism = N: every worker runs at once (torchrun waits for all of them); the
      Job controller gives pod i the hostname <job>-i and JOB_COMPLETION_INDEX=i (its node rank).
    - backoffLimitPerIndex with maxFailedIndexes 0, not a Job-wide backoffLimit: when one worker
      fails, its peers' collectives fail too, so every index fails once per group restart. Counted
      per index, runPolicy.backoffLimit keeps meaning "restarts of the training" whatever N is; once
      one index is out of retries the whole Job fails and its other pods are stopped (never a
      half-alive group). The podFailurePolicy rules (exit 2 fails the Job, 75 and disruptions don't
      count) apply unchanged.
    - successPolicy on index 0: rank 0 exits 0 only after the export is written and every rank has
      seen it, so the Job is done then; a peer that trips while shutting down is not retried (a lone
      retried worker would wait for a rank 0 that is gone).
    """
    n = spec.workers
    job_spec.pop("backoffLimit")
    job_spec.update(completions=n, parallelism=n, completionMode="Indexed",
                    backoffLimitPerIndex=spec.run_policy.backoff_limit, maxFailedIndexes=0,
                    successPolicy={"rules": [{"succeededIndexes": "0"}]})


def build_service(ftj: FineTuneJob) -> Obj:
    """The headless Service behind worker 0's stable name <job>-0.<service> (multi-worker jobs).

    Not-ready addresses are published: the pods have no readiness probe, and workers must find
    worker 0 while it is starting — that is when torchrun's rendezvous happens.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(ftj, service_name(ftj.name)),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(ftj.uid),
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                       "protocol": "TCP"}],
        },
    }


def pod_spec(ftj: FineTuneJob, settings: Settings, teacher: TeacherExport | None = None) -> Obj:
    """Restricted pod: non-root, no token, read-only root with writable /tmp and /dev/shm."""
    spec = ftj.valid_spec()
    volumes, mounts = _volumes(ftj, spec, settings)
    if teacher is not None:
        volume, mount = teacher.pod_mount(volumes)
        volumes += [volume] if volume else []
        mounts.append(mount)
    pod: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_group,
            "fsGroup": settings.fs_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(ftj, spec, settings, mounts)],
        "volumes": volumes,
    }
    if fetch := fetch_init_container(spec, pod["containers"][0]):  # dataset.uri / weights.uri
        pod["initContainers"], secret_volumes = fetch
        volumes += secret_volumes
    if spec.workers > 1:
        pod["subdomain"] = service_name(ftj.name)  # with the Job's hostnames: DNS names <job>-<index>.<service>
    if settings.trainer_service_account:
        pod["serviceAccountName"] = settings.trainer_service_account
    if spec.scheduling.node_selector:
        pod["nodeSelector"] = dict(spec.scheduling.node_selector)
    if spec.scheduling.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.scheduling.tolerations]
    if spec.scheduling.priority_class_name:
        pod["priorityClassName"] = spec.scheduling.priority_class_name
    return pod


def _container(ftj: FineTuneJob, spec: FineTuneJobSpec, settings: Settings, mounts: list[Obj]) -> Obj:
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # Read-only root: every cache a library might write goes under the /tmp emptyDir.
        {"name": "HOME", "value": TMP_DIR},
        {"name": "XDG_CACHE_HOME", "value": f"{TMP_DIR}/.cache"},
        {"name": "TORCH_HOME", "value": f"{TMP_DIR}/torch"},
        # torch sizes its thread pool by the node's cores, not the pod's CPU limit: on a shared node that
        # oversubscribes the cores and crawls. The limit (rounded up; the node's cores when unset) is the pool.
        {
            "name": "OMP_NUM_THREADS",
            "valueFrom": {"resourceFieldRef": {"containerName": CONTAINER, "resource": "limits.cpu", "divisor": "1"}},
        },
        {"name": "FINETUNE_JOB_NAME", "value": ftj.name},
        {"name": "FINETUNE_JOB_NAMESPACE", "value": ftj.namespace},
    ]
    if settings.progress_url:
        env += [
            {"name": "FINETUNE_PROGRESS_URL", "value": progress_endpoint(ftj, settings)},
            {"name": "FINETUNE_PROGRESS_TOKEN_FILE", "value": PROGRESS_TOKEN_FILE},
        ]
    trainer_args = ["-f", JOB_FILE, "--report", "jsonl"]
    container: Obj = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["finetune-train"],
        # A list, never a shell string: nothing from the spec reaches a shell.
        "args": torchrun_args(ftj, settings) + trainer_args if spec.workers > 1 else trainer_args,
        "env": env,
        "resources": _resources(spec),
        "volumeMounts": mounts,
        # The trainer's last log lines become the termination message when it writes none.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.workers > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    return container


def torchrun_args(ftj: FineTuneJob, settings: Settings) -> list[str]:
    """`finetune-train torchrun …` (torchrun keeping the trainer's exit codes) for one worker pod.

    Static rendezvous: node rank = the pod's completion index (the kubelet expands
    $(JOB_COMPLETION_INDEX) from the env var the Job controller sets), master = worker 0's stable
    DNS name. Deterministic, and no elastic membership to get wrong: a failed worker fails the
    group and the Job restarts it (--max-restarts=0). Worker 0 waits for the others, and they retry
    reaching it, for as long as a pod may take to start (the startup deadline); on SIGTERM the agent
    gives the trainer the pod's grace period to checkpoint.
    """
    spec = ftj.valid_spec()
    return [
        "torchrun",
        f"--nnodes={spec.workers}",
        f"--nproc-per-node={max(1, spec.resources.gpus)}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={master_address(ftj.name)}",
        f"--master-port={RENDEZVOUS_PORT}",
        f"--rdzv-conf=timeout={ftj.startup_deadline_seconds(settings)}",
        "--max-restarts=0",
        f"--shutdown-timeout={settings.termination_grace_seconds}",
        "-m", "finetune_trainer",
    ]


def _resources(spec: FineTuneJobSpec) -> Obj:
    amounts: dict[str, Any] = {}
    if spec.resources.cpu:
        amounts["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        amounts["memory"] = spec.resources.memory
    limits = dict(amounts)
    if spec.resources.gpus > 0:
        # Extended resources are limits only; the request defaults to the limit.
        limits["nvidia.com/gpu"] = spec.resources.gpus
    out: Obj = {}
    if amounts:
        out["requests"] = amounts
    if limits:
        out["limits"] = limits
    return out


def _volumes(ftj: FineTuneJob, spec: FineTuneJobSpec, settings: Settings) -> tuple[list[Obj], list[Obj]]:
    """Pod volumes and the trainer's mounts: the job file, scratch, output, then the user's."""
    volumes: list[Obj] = [
        {"name": VOL_JOB_FILE, "configMap": {"name": configmap_name(ftj.name)}},
        {"name": VOL_TMP, "emptyDir": {"sizeLimit": settings.tmp_size}},
        {"name": VOL_SHM, "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
    ]
    mounts: list[Obj] = [
        {"name": VOL_JOB_FILE, "mountPath": JOB_FILE_DIR, "readOnly": True},
        {"name": VOL_TMP, "mountPath": TMP_DIR},
        {"name": VOL_SHM, "mountPath": SHM_DIR},
    ]
    if settings.progress_url:
        # 0440 with the pod's fsGroup: the non-root trainer can read its own token, nothing else can write.
        secret = {"secretName": token_secret_name(ftj.name), "defaultMode": 0o440}
        volumes.append({"name": VOL_PROGRESS, "secret": secret})
        mounts.append({"name": VOL_PROGRESS, "mountPath": PROGRESS_DIR, "readOnly": True})
    if output_volume(spec) is None:
        if settings.output_pvc:
            volumes.append({"name": VOL_OUTPUT, "persistentVolumeClaim": {"claimName": settings.output_pvc}})
            mounts.append({"name": VOL_OUTPUT, "mountPath": spec.output.path, "subPath": ftj.name})
        else:
            # Nothing durable holds the output: an emptyDir keeps the trainer working, and
            # status.output.ephemeral / an event tell the user the model dies with the pod.
            volumes.append({"name": VOL_OUTPUT, "emptyDir": {}})
            mounts.append({"name": VOL_OUTPUT, "mountPath": spec.output.path})
    for vol in spec.volumes:
        volumes.append(vol.source())
        mounts.append({"name": vol.name, "mountPath": vol.mount_path, "readOnly": vol.read_only})
    if (cache := _shared_cache_mount(spec, settings)) is not None:
        volumes.append(cache[0])
        mounts.append(cache[1])
    return volumes, mounts


def _shared_cache_mount(spec: FineTuneJobSpec, settings: Settings) -> tuple[Obj, Obj] | None:
    """training.featureCacheDir outside every mount (a sweep trial on the output PVC): the PVC's feature-cache
    folder, shared by content digest; with no PVC an emptyDir (unshared) keeps the trainer working."""
    where = spec.training.feature_cache_dir and posixpath.normpath(spec.training.feature_cache_dir)
    if not where or any(within(where, posixpath.normpath(m)) for m in
                        [*(v.mount_path for v in spec.volumes), spec.output.path]):
        return None
    if settings.output_pvc:
        return ({"name": VOL_FEATURE_CACHE, "persistentVolumeClaim": {"claimName": settings.output_pvc}},
                {"name": VOL_FEATURE_CACHE, "mountPath": where, "subPath": "feature-cache"})
    return {"name": VOL_FEATURE_CACHE, "emptyDir": {}}, {"name": VOL_FEATURE_CACHE, "mountPath": where}


def progress_endpoint(ftj: FineTuneJob, settings: Settings) -> str:
    """The URL this job's trainer pushes to; the token only opens this path."""
    return f"{settings.progress_url.rstrip('/')}/v1/progress/{ftj.namespace}/{ftj.name}"


def build_token_secret(ftj: FineTuneJob, token: str) -> Obj:
    """The per-job progress credential. Owned by the FineTuneJob, so it goes when the job goes."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": child_metadata(ftj, token_secret_name(ftj.name)),
        "stringData": {"token": token},
    }
