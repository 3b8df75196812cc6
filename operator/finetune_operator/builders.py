"""Pure builders: a FineTuneJob (as the API returns it) → the ConfigMap and batch/v1 Job for it
(plus, for spec.workers > 1, the headless Service its worker pods find each other through).

No API calls here; handlers add the ownerReference and create what is missing. The same
FineTuneJob always yields the same objects (names, labels, args), so a restarted
operator recognises what it created before.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Mapping
from typing import Any

import yaml

from finetune_operator.settings import Settings
from finetune_trainer.errors import EXIT_INVALID_JOB, EXIT_PREEMPTED, JobFileError
from finetune_trainer.spec import API_GROUP, API_VERSION, KIND, FineTuneJobSpec, parse_spec

Obj = dict[str, Any]

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
RESERVED_VOLUMES = (VOL_JOB_FILE, VOL_TMP, VOL_SHM, VOL_OUTPUT, VOL_PROGRESS)
RESERVED_MOUNTS = (JOB_FILE_DIR, TMP_DIR, SHM_DIR, PROGRESS_DIR)

# Selection label: the FineTuneJob's uid (always a valid label value, unlike long names).
LABEL_UID = f"{API_GROUP}/finetunejob-uid"
LABEL_NAME = f"{API_GROUP}/finetunejob"  # for humans; hashed when the name is too long
ANNOTATION_NAME = f"{API_GROUP}/finetunejob"  # the full name, never truncated
ANNOTATION_DIGEST = f"{API_GROUP}/spec-digest"
MANAGED_BY = "finetune-operator"
# Labels copied from the FineTuneJob to the Job so that queueing (Kueue) sees them.
PASSTHROUGH_LABELS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")
# Spec fields that may change after the Job exists (propagated, not refused).
MUTABLE_FIELDS = {"runPolicy": ("suspend",)}
MAX_JOB_NAME = 63  # the Job controller copies the name into a label value
# Multi-worker jobs: torchrun's static rendezvous on worker 0, reached as <job>-0.<service>.
RENDEZVOUS_PORT = 29500
MAX_HOSTNAME = 63  # the Job controller names each pod's host <job>-<index>: a DNS label
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Service names
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _fit(name: str, limit: int) -> str:
    """`name` if it fits, else a truncated prefix plus a hash of the whole (still unique)."""
    if len(name) <= limit:
        return name
    return f"{name[: limit - 9].rstrip('-.')}-{_short_hash(name)}"


def job_name(ftj: Mapping[str, Any]) -> str:
    """The Job's name: the FineTuneJob's name, hashed down to 63 characters if longer."""
    return _fit(ftj["metadata"]["name"], MAX_JOB_NAME)


def configmap_name(ftj: Mapping[str, Any]) -> str:
    return f"{job_name(ftj)}-spec"


def service_name(ftj: Mapping[str, Any]) -> str:
    """The headless Service of a multi-worker job, also its pods' subdomain: the Job's name when that
    is a valid Service name (DNS-1035: starts with a letter), else prefixed."""
    name = job_name(ftj)
    return name if DNS_1035.match(name) else _fit(f"ftj-{name}", MAX_JOB_NAME)


def master_address(ftj: Mapping[str, Any]) -> str:
    """Worker 0's stable DNS name (resolved through the pod's namespace search path)."""
    return f"{job_name(ftj)}-0.{service_name(ftj)}"


def selector_labels(ftj: Mapping[str, Any]) -> dict[str, str]:
    """Labels that find this FineTuneJob's Job and pods (the API server filters by them)."""
    return {LABEL_UID: ftj["metadata"]["uid"]}


def common_labels(ftj: Mapping[str, Any]) -> dict[str, str]:
    own = ftj["metadata"].get("labels") or {}
    return {
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_NAME: _fit(ftj["metadata"]["name"], 63),
        **selector_labels(ftj),
        **{k: own[k] for k in PASSTHROUGH_LABELS if k in own},
    }


def spec_digest(spec: Mapping[str, Any]) -> dict[str, str]:
    """A short hash per top-level field of the resolved spec, minus the fields that may change.

    Stored on the Job, it lets status name which fields changed after creation. Hashing the
    resolved spec (not the stored one) keeps a new server-side default from looking like a change.
    """
    digest = {}
    for key, value in spec.items():
        if isinstance(value, Mapping) and key in MUTABLE_FIELDS:
            value = {k: v for k, v in value.items() if k not in MUTABLE_FIELDS[key]}
        digest[key] = _short_hash(json.dumps(value, sort_keys=True, default=str))
    return digest


def changed_fields(ftj: Mapping[str, Any], job: Mapping[str, Any]) -> list[str]:
    """Top-level spec fields changed since the Job was created (empty when unknown)."""
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_DIGEST)
    try:
        before = json.loads(raw) if raw else None
    except ValueError:
        before = None
    if not isinstance(before, dict):
        return []
    now = spec_digest(_comparable_spec(ftj))
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def _comparable_spec(ftj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The resolved spec (defaults filled, as at creation); the raw one if it no longer parses."""
    try:
        return parsed_spec(ftj).to_wire()
    except JobFileError:
        return ftj.get("spec") or {}


def resolved_job_file(ftj: Mapping[str, Any], spec: FineTuneJobSpec) -> str:
    """The job file the trainer reads: the validated spec with every default filled in."""
    doc = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": ftj["metadata"]["name"], "namespace": ftj["metadata"].get("namespace")},
        "spec": spec.to_wire(),
    }
    return yaml.safe_dump(doc, sort_keys=False)


def parsed_spec(ftj: Mapping[str, Any]) -> FineTuneJobSpec:
    """The validated spec; raises JobFileError with a one-line, field-naming message."""
    return parse_spec(ftj.get("spec"))


def child_metadata(ftj: Mapping[str, Any], name: str, annotations: Mapping[str, str] | None = None) -> Obj:
    """Metadata every child carries: its name, the FineTuneJob's namespace, selection labels, full name."""
    return {
        "name": name,
        "namespace": ftj["metadata"].get("namespace"),
        "labels": common_labels(ftj),
        "annotations": {ANNOTATION_NAME: ftj["metadata"]["name"], **(annotations or {})},
    }


def build_configmap(ftj: Mapping[str, Any], settings: Settings) -> Obj:
    """The ConfigMap holding the resolved job file (mounted read-only at /etc/finetune)."""
    spec = parsed_spec(ftj)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(ftj, configmap_name(ftj)),
        "data": {"job.yaml": resolved_job_file(ftj, spec)},
    }


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
    return problems + _output_problems(spec)


def _worker_problems(spec: FineTuneJobSpec, name: str | None) -> list[str]:
    """Multi-worker pods are named <job>-<index> by the Job controller and found as <job>-0.<service>:
    the name must make valid hostnames (a DNS label) for every index."""
    if spec.workers == 1 or name is None:
        return []
    job = _fit(name, MAX_JOB_NAME)
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
    return any(_within(mount, r) or _within(r, mount) for r in RESERVED_MOUNTS)


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def output_volume(spec: FineTuneJobSpec) -> Any:
    """The user volume whose mount holds spec.output.path (the deepest one), or None."""
    out = posixpath.normpath(spec.output.path)
    holders = [v for v in spec.volumes if _within(out, posixpath.normpath(v.mount_path))]
    return max(holders, key=lambda v: len(v.mount_path), default=None)


def output_location(ftj: Mapping[str, Any], spec: FineTuneJobSpec, settings: Settings) -> dict[str, Any]:
    """Where the model ends up: a user volume, the operator's output PVC, or an emptyDir."""
    holder = output_volume(spec)
    if holder is not None:
        return {"path": spec.output.path, "volume": holder.name, "ephemeral": False}
    if settings.output_pvc:
        return {"path": spec.output.path, "volume": VOL_OUTPUT, "ephemeral": False}
    return {"path": spec.output.path, "volume": VOL_OUTPUT, "ephemeral": True}


def pod_failure_policy() -> Obj:
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
        ]
    }


def build_job(ftj: Mapping[str, Any], settings: Settings) -> Obj:
    """The batch/v1 Job running `finetune-train -f /etc/finetune/job.yaml` for this FineTuneJob."""
    spec = parsed_spec(ftj)
    run = spec.run_policy
    labels = common_labels(ftj)
    job_spec: Obj = {
        "backoffLimit": run.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "suspend": run.suspend,
        "podFailurePolicy": pod_failure_policy(),
        "template": {
            "metadata": {"labels": dict(labels), "annotations": {ANNOTATION_NAME: ftj["metadata"]["name"]}},
            "spec": pod_spec(ftj, spec, settings),
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
        "metadata": child_metadata(
            ftj, job_name(ftj), {ANNOTATION_DIGEST: json.dumps(spec_digest(spec.to_wire()), sort_keys=True)}
        ),
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


def build_service(ftj: Mapping[str, Any]) -> Obj:
    """The headless Service behind worker 0's stable name <job>-0.<service> (multi-worker jobs).

    Not-ready addresses are published: the pods have no readiness probe, and workers must find
    worker 0 while it is starting — that is when torchrun's rendezvous happens.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(ftj, service_name(ftj)),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(ftj),
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                       "protocol": "TCP"}],
        },
    }


def pod_spec(ftj: Mapping[str, Any], spec: FineTuneJobSpec, settings: Settings) -> Obj:
    """Restricted pod: non-root, no token, read-only root with writable /tmp and /dev/shm."""
    volumes, mounts = _volumes(ftj, spec, settings)
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
    if spec.workers > 1:
        pod["subdomain"] = service_name(ftj)  # with the Job's hostnames: DNS names <job>-<index>.<service>
    if settings.trainer_service_account:
        pod["serviceAccountName"] = settings.trainer_service_account
    if spec.scheduling.node_selector:
        pod["nodeSelector"] = dict(spec.scheduling.node_selector)
    if spec.scheduling.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.scheduling.tolerations]
    if spec.scheduling.priority_class_name:
        pod["priorityClassName"] = spec.scheduling.priority_class_name
    return pod


def _container(ftj: Mapping[str, Any], spec: FineTuneJobSpec, settings: Settings, mounts: list[Obj]) -> Obj:
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
        {"name": "FINETUNE_JOB_NAME", "value": ftj["metadata"]["name"]},
        {"name": "FINETUNE_JOB_NAMESPACE", "value": ftj["metadata"].get("namespace") or ""},
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
        "args": torchrun_args(ftj, spec, settings) + trainer_args if spec.workers > 1 else trainer_args,
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


def torchrun_args(ftj: Mapping[str, Any], spec: FineTuneJobSpec, settings: Settings) -> list[str]:
    """`finetune-train torchrun …` (torchrun keeping the trainer's exit codes) for one worker pod.

    Static rendezvous: node rank = the pod's completion index (the kubelet expands
    $(JOB_COMPLETION_INDEX) from the env var the Job controller sets), master = worker 0's stable
    DNS name. Deterministic, and no elastic membership to get wrong: a failed worker fails the
    group and the Job restarts it (--max-restarts=0). Worker 0 waits for the others, and they retry
    reaching it, for as long as a pod may take to start (the startup deadline); on SIGTERM the agent
    gives the trainer the pod's grace period to checkpoint.
    """
    startup = spec.run_policy.startup_deadline_seconds or settings.startup_deadline_seconds
    return [
        "torchrun",
        f"--nnodes={spec.workers}",
        f"--nproc-per-node={max(1, spec.resources.gpus)}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={master_address(ftj)}",
        f"--master-port={RENDEZVOUS_PORT}",
        f"--rdzv-conf=timeout={startup}",
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


def _volumes(ftj: Mapping[str, Any], spec: FineTuneJobSpec, settings: Settings) -> tuple[list[Obj], list[Obj]]:
    """Pod volumes and the trainer's mounts: the job file, scratch, output, then the user's."""
    volumes: list[Obj] = [
        {"name": VOL_JOB_FILE, "configMap": {"name": configmap_name(ftj)}},
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
        volumes.append({"name": VOL_PROGRESS, "secret": {"secretName": token_secret_name(ftj), "defaultMode": 0o440}})
        mounts.append({"name": VOL_PROGRESS, "mountPath": PROGRESS_DIR, "readOnly": True})
    if output_volume(spec) is None:
        if settings.output_pvc:
            volumes.append({"name": VOL_OUTPUT, "persistentVolumeClaim": {"claimName": settings.output_pvc}})
            mounts.append({"name": VOL_OUTPUT, "mountPath": spec.output.path, "subPath": ftj["metadata"]["name"]})
        else:
            # Nothing durable holds the output: an emptyDir keeps the trainer working, and
            # status.output.ephemeral / an event tell the user the model dies with the pod.
            volumes.append({"name": VOL_OUTPUT, "emptyDir": {}})
            mounts.append({"name": VOL_OUTPUT, "mountPath": spec.output.path})
    for vol in spec.volumes:
        volumes.append(vol.source())
        mounts.append({"name": vol.name, "mountPath": vol.mount_path, "readOnly": vol.read_only})
    return volumes, mounts


def token_secret_name(ftj: Mapping[str, Any]) -> str:
    return f"{job_name(ftj)}-progress"


def progress_endpoint(ftj: Mapping[str, Any], settings: Settings) -> str:
    """The URL this job's trainer pushes to; the token only opens this path."""
    meta = ftj["metadata"]
    return f"{settings.progress_url.rstrip('/')}/v1/progress/{meta.get('namespace')}/{meta['name']}"


def build_token_secret(ftj: Mapping[str, Any], token: str) -> Obj:
    """The per-job progress credential. Owned by the FineTuneJob, so it goes when the job goes."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": child_metadata(ftj, token_secret_name(ftj)),
        "stringData": {"token": token},
    }
