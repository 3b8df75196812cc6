"""Operator settings, read once from the environment (the Helm chart sets them).

Every setting has a safe default so `python -m finetune_operator` runs against a dev
cluster with nothing set. Bad values fail at startup with the variable's name, not later.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot use."""


@dataclass(frozen=True)
class Settings:
    # The trainer image used when spec.image is empty.
    trainer_image: str = "finetune-trainer:latest"
    image_pull_policy: str = "IfNotPresent"
    # serviceAccountName of trainer pods (one without API rights; its token is never mounted).
    trainer_service_account: str = ""
    # Empty: watch the whole cluster. Otherwise kopf namespace patterns (globs allowed).
    namespaces: tuple[str, ...] = ()
    # Pending this long with an image-pull / scheduling / pod-creation problem → Failed.
    # spec.runPolicy.startupDeadlineSeconds overrides it per job.
    startup_deadline_seconds: int = 600
    # How often the timer re-derives status of unfinished jobs (deadlines, missed events).
    resync_seconds: float = 30.0
    # SIGTERM → the trainer checkpoints and exits 75; this is how long it gets.
    termination_grace_seconds: int = 120
    # When no user volume holds spec.output.path: a PVC of this name in the job's
    # namespace (subPath = the FineTuneJob's name), or, when empty, an emptyDir.
    output_pvc: str = ""
    # Base URL trainers push progress to (KEP-2779 style), e.g. http://finetune-operator.ops.svc:8081;
    # empty = no push (progress from logs only), no per-job token Secret.
    progress_url: str = ""
    # host:port of the operator's HTTP server (progress pushes and /metrics); empty = off.
    http_listen: str = "0.0.0.0:8081"
    # Pod security: the trainer runs as this non-root uid/gid; fsGroup makes volumes writable.
    run_as_user: int = 1000
    run_as_group: int = 1000
    fs_group: int = 1000
    # hostPath volumes bypass the node's isolation: off unless the cluster admin allows them.
    allow_host_path: bool = False
    # Memory-backed /dev/shm for DataLoader workers (the container default is 64Mi).
    shm_size: str = "1Gi"
    tmp_size: str = "2Gi"
    liveness_endpoint: str = "http://0.0.0.0:8080/healthz"
    # kopf: handler log records at or above this level are also posted as k8s Events.
    posting_level: str = "WARNING"
    watch_server_timeout: int = 300

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from FINETUNE_* variables; unset or empty variables keep the default."""
        env = os.environ if env is None else env
        d = cls()

        def get(name: str, default: str) -> str:
            return env.get(f"FINETUNE_{name}", "").strip() or default

        return cls(
            trainer_image=get("TRAINER_IMAGE", d.trainer_image),
            image_pull_policy=_choice(
                get("IMAGE_PULL_POLICY", d.image_pull_policy),
                "IMAGE_PULL_POLICY",
                ("Always", "IfNotPresent", "Never"),
            ),
            trainer_service_account=get("TRAINER_SERVICE_ACCOUNT", d.trainer_service_account),
            namespaces=tuple(ns.strip() for ns in get("NAMESPACES", "").split(",") if ns.strip()),
            startup_deadline_seconds=_int(
                get("STARTUP_DEADLINE_SECONDS", str(d.startup_deadline_seconds)),
                "STARTUP_DEADLINE_SECONDS",
                1,
            ),
            resync_seconds=_float(get("RESYNC_SECONDS", str(d.resync_seconds)), "RESYNC_SECONDS", 0.1),
            termination_grace_seconds=_int(
                get("TERMINATION_GRACE_SECONDS", str(d.termination_grace_seconds)),
                "TERMINATION_GRACE_SECONDS",
                0,
            ),
            output_pvc=get("OUTPUT_PVC", d.output_pvc),
            progress_url=get("PROGRESS_URL", d.progress_url),
            http_listen=env.get("FINETUNE_HTTP_LISTEN", d.http_listen).strip(),
            run_as_user=_int(get("RUN_AS_USER", str(d.run_as_user)), "RUN_AS_USER", 1),
            run_as_group=_int(get("RUN_AS_GROUP", str(d.run_as_group)), "RUN_AS_GROUP", 0),
            fs_group=_int(get("FS_GROUP", str(d.fs_group)), "FS_GROUP", 0),
            allow_host_path=_bool(get("ALLOW_HOST_PATH", "false"), "ALLOW_HOST_PATH"),
            shm_size=get("SHM_SIZE", d.shm_size),
            tmp_size=get("TMP_SIZE", d.tmp_size),
            liveness_endpoint=get("LIVENESS_ENDPOINT", d.liveness_endpoint),
            posting_level=_choice(
                get("POSTING_LEVEL", d.posting_level).upper(),
                "POSTING_LEVEL",
                ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
            ),
            watch_server_timeout=_int(
                get("WATCH_SERVER_TIMEOUT", str(d.watch_server_timeout)), "WATCH_SERVER_TIMEOUT", 1
            ),
        )


def _int(value: str, name: str, minimum: int) -> int:
    return _number(value, name, minimum, int, "an integer")


def _float(value: str, name: str, minimum: float) -> float:
    return _number(value, name, minimum, float, "a number")


def _number(value: str, name: str, minimum: Any, parse: Callable[[str], Any], noun: str) -> Any:
    try:
        number = parse(value)
    except ValueError:
        raise SettingsError(f"FINETUNE_{name}: expected {noun}, got {value!r}") from None
    if number < minimum:
        raise SettingsError(f"FINETUNE_{name}: must be >= {minimum}, got {number}")
    return number


def _bool(value: str, name: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"FINETUNE_{name}: expected true or false, got {value!r}")


def _choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SettingsError(f"FINETUNE_{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value
