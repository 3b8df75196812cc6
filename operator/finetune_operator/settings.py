"""Operator settings: one validated model, read once from the environment the Helm chart sets.

Each setting has one name, its environment variable: FINETUNE_ plus the field's name in capitals
(`from_env` derives it, nothing renames it). CHART_VALUES below is the one table of which values.yaml
keys the chart turns into each variable; tests/unit/test_chart.py renders the chart with every key in it
changed and checks the value arrives in the field, and that no other key changes any setting.

Every setting has a safe default so `python -m finetune_operator` runs against a dev cluster with nothing
set; an unset or empty variable keeps it. Bad values fail at startup with the variable's name.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

ENV_PREFIX = "FINETUNE_"

# values.yaml key → the variables it sets (templates/deployment.yaml, through _helpers.tpl for the derived
# ones: image references, the watched namespaces, the trainer ServiceAccount's and the Service's names).
CHART_VALUES: dict[str, tuple[str, ...]] = {
    "trainer.image.repository": ("FINETUNE_TRAINER_IMAGE",),
    "trainer.image.tag": ("FINETUNE_TRAINER_IMAGE",),
    "trainer.image.digest": ("FINETUNE_TRAINER_IMAGE",),
    "trainer.image.pullPolicy": ("FINETUNE_IMAGE_PULL_POLICY",),
    "serving.image.repository": ("FINETUNE_SERVE_IMAGE",),
    "serving.image.tag": ("FINETUNE_SERVE_IMAGE",),
    "serving.image.digest": ("FINETUNE_SERVE_IMAGE",),
    "trainer.serviceAccount.create": ("FINETUNE_TRAINER_SERVICE_ACCOUNT",),
    "trainer.serviceAccount.name": ("FINETUNE_TRAINER_SERVICE_ACCOUNT",),
    "trainer.runAsUser": ("FINETUNE_RUN_AS_USER",),
    "trainer.runAsGroup": ("FINETUNE_RUN_AS_GROUP",),
    "trainer.fsGroup": ("FINETUNE_FS_GROUP",),
    "trainer.outputPVC": ("FINETUNE_OUTPUT_PVC",),
    "trainer.startupDeadlineSeconds": ("FINETUNE_STARTUP_DEADLINE_SECONDS",),
    "trainer.terminationGracePeriodSeconds": ("FINETUNE_TERMINATION_GRACE_SECONDS",),
    "trainer.shmSize": ("FINETUNE_SHM_SIZE",),
    "trainer.tmpSize": ("FINETUNE_TMP_SIZE",),
    "trainer.allowHostPath": ("FINETUNE_ALLOW_HOST_PATH",),
    "rbac.clusterWide": ("FINETUNE_NAMESPACES", "FINETUNE_TRAINER_SERVICE_ACCOUNT"),
    "watchNamespaces": ("FINETUNE_NAMESPACES",),
    "operator.postingLevel": ("FINETUNE_POSTING_LEVEL",),
    "operator.resyncSeconds": ("FINETUNE_RESYNC_SECONDS",),
    "operator.watchServerTimeout": ("FINETUNE_WATCH_SERVER_TIMEOUT",),
    "health.port": ("FINETUNE_LIVENESS_ENDPOINT",),
    "server.enabled": ("FINETUNE_HTTP_LISTEN", "FINETUNE_PROGRESS_URL"),
    "server.port": ("FINETUNE_HTTP_LISTEN", "FINETUNE_PROGRESS_URL"),
    "server.progressURL": ("FINETUNE_PROGRESS_URL",),
    "nameOverride": ("FINETUNE_PROGRESS_URL", "FINETUNE_TRAINER_SERVICE_ACCOUNT"),
    "fullnameOverride": ("FINETUNE_PROGRESS_URL", "FINETUNE_TRAINER_SERVICE_ACCOUNT"),
}
# Settings whose empty value means "off" rather than "the default".
EMPTY_MEANS_OFF = frozenset({"http_listen"})


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot use."""


@dataclass(frozen=True)
class Settings:
    # The trainer image used when spec.image is empty.
    trainer_image: str = "finetune-trainer:latest"
    # The serve image (the Dockerfile's `serve` target): spec.serving's smoke-test Job runs
    # finetune_serve.smoke in it.
    serve_image: str = "finetune-serve:latest"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    # serviceAccountName of trainer pods (one without API rights; its token is never mounted).
    trainer_service_account: str = ""
    # Empty: watch the whole cluster. Otherwise kopf namespace patterns (globs allowed), comma-separated.
    namespaces: tuple[str, ...] = ()
    # Pending this long with an image-pull / scheduling / pod-creation problem → Failed.
    # spec.runPolicy.startupDeadlineSeconds overrides it per job.
    startup_deadline_seconds: Annotated[int, Field(ge=1)] = 600
    # How often the resync loop re-derives status of unfinished jobs (deadlines, missed events).
    resync_seconds: Annotated[float, Field(ge=0.1)] = 30.0
    # SIGTERM → the trainer checkpoints and exits 75; this is how long it gets.
    termination_grace_seconds: Annotated[int, Field(ge=0)] = 120
    # When no user volume holds spec.output.path: a PVC of this name in the job's
    # namespace (subPath = the FineTuneJob's name), or, when empty, an emptyDir.
    output_pvc: str = ""
    # Base URL trainers push progress to (KEP-2779 style), e.g. http://finetune-operator.ops.svc:8081;
    # empty = no push (progress from logs only), no per-job token Secret.
    progress_url: str = ""
    # host:port of the operator's HTTP server (progress pushes and /metrics); empty = off.
    http_listen: str = "0.0.0.0:8081"
    # Pod security: the trainer runs as this non-root uid/gid; fsGroup makes volumes writable.
    run_as_user: Annotated[int, Field(ge=1)] = 1000
    run_as_group: Annotated[int, Field(ge=0)] = 1000
    fs_group: Annotated[int, Field(ge=0)] = 1000
    # hostPath volumes bypass the node's isolation: off unless the cluster admin allows them.
    allow_host_path: bool = False
    # Memory-backed /dev/shm for DataLoader workers (the container default is 64Mi).
    shm_size: str = "1Gi"
    tmp_size: str = "2Gi"
    liveness_endpoint: str = "http://0.0.0.0:8080/healthz"
    # kopf: handler log records at or above this level are also posted as k8s Events.
    posting_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "WARNING"
    watch_server_timeout: Annotated[int, Field(ge=1)] = 300

    @field_validator("namespaces", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(ns.strip() for ns in value.split(",") if ns.strip())
        return value

    @field_validator("posting_level", mode="before")
    @classmethod
    def _level_in_capitals(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("http_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            _split_listen(value)
        return value

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def listen(self) -> tuple[str, int] | None:
        """(host, port) of the HTTP server, or None when it is off."""
        return _split_listen(self.http_listen) if self.http_listen else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from FINETUNE_* variables; unset or empty variables keep the default."""
        env = os.environ if env is None else env
        given: dict[str, str] = {}
        for f in dataclasses.fields(cls):
            var = env_var(f.name)
            if var in env:
                value = env[var].strip()
                if value or f.name in EMPTY_MEANS_OFF:
                    given[f.name] = value
        try:
            return cls(**given)
        except ValidationError as err:
            raise SettingsError(_describe(err)) from None


def env_var(field: str) -> str:
    """The environment variable of a setting: its one name."""
    return f"{ENV_PREFIX}{field.upper()}"


def _split_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return host or "0.0.0.0", int(port)
    except ValueError:
        raise ValueError(f"expected host:port, got {text!r}") from None


def _describe(err: ValidationError) -> str:
    """One line per bad variable: `FINETUNE_RESYNC_SECONDS: Input should be a valid number (got 'soon')`."""
    lines = []
    for e in err.errors(include_url=False):
        name = env_var(str(e["loc"][0])) if e["loc"] else ENV_PREFIX.rstrip("_")
        lines.append(f"{name}: {e['msg'].removeprefix('Value error, ')} (got {e['input']!r})")
    return "; ".join(lines)
