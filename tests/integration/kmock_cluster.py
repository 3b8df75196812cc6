"""Helpers: a kmock Kubernetes API and the real operator (kopf, in-process) running against it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import kmock
import kopf
import pytest

from finetune_operator.handlers import register
from finetune_operator.kube import Kube
from finetune_operator.reconcile import Runtime
from finetune_operator.settings import Settings

VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}
RESOURCES = {
    "v1/namespaces": {"kind": "Namespace", "namespaced": False},  # kopf waits for it in discovery
    "finetune.dev/v1alpha1/finetunejobs": {
        "kind": "FineTuneJob",
        "namespaced": True,
        "subresources": {"status"},
    },
    "batch/v1/jobs": {"kind": "Job", "namespaced": True, "subresources": {"status"}},
    "v1/pods": {"kind": "Pod", "namespaced": True, "subresources": {"status"}},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "v1/events": {"kind": "Event", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "namespaced": True},
}
FTJ = "finetune.dev/v1alpha1/finetunejobs"
JOBS = "batch/v1/jobs"
PODS = "v1/pods"
CONFIGMAPS = "v1/configmaps"
EVENTS = "v1/events"
SECRETS = "v1/secrets"
NS = "ml"
_versions = itertools.count(1)
_uids = itertools.count(1)


def now_text() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class Cluster:
    """The mock API plus helpers that act like the parts of Kubernetes kmock lacks."""

    k8s: kmock.KubernetesEmulator
    server: kmock.Server

    @property
    def url(self) -> str:
        return str(self.server.url).rstrip("/")

    def objects(self, resource: str) -> list[dict[str, Any]]:
        wanted = kmock.resource(resource)
        return [obj.raw for (res, _, _), obj in self.k8s.objects.items() if res == wanted and not obj.deleted]

    def get(self, resource: str, name: str, namespace: str = NS) -> dict[str, Any] | None:
        key = (kmock.resource(resource), namespace, name)  # `in` needs a parsed resource, not a string
        if key not in self.k8s.objects or self.k8s.objects[key].deleted:
            return None
        return self.k8s.objects[key].raw

    def requests(self, *criteria: Any) -> int:
        return len(self.k8s[criteria])

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        # kmock assigns nothing: seed what a real API server would (kopf's patches test resourceVersion).
        meta = body.setdefault("metadata", {})
        meta.setdefault("namespace", NS)
        meta.setdefault("uid", f"uid-{next(_uids)}")
        meta.setdefault("resourceVersion", str(next(_versions)))
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", now_text())
        resp = await self.server.client.post(path, json=body)
        assert resp.status < 300, await resp.text()
        return await resp.json()

    async def patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/merge-patch+json"}
        resp = await self.server.client.patch(path, json=patch, headers=headers)
        assert resp.status < 300, await resp.text()
        return await resp.json()

    async def delete(self, path: str) -> None:
        resp = await self.server.client.delete(path)
        assert resp.status < 300, await resp.text()


# Short intervals: the timer notices deadlines; the suite polls instead of sleeping.
TEST_SETTINGS = Settings(
    trainer_image="trainer:test", resync_seconds=0.3, startup_deadline_seconds=600, http_listen=""
)


@contextlib.asynccontextmanager
async def running_operator(cluster: Cluster, settings: Settings = TEST_SETTINGS) -> AsyncIterator[Runtime]:
    """The operator in its own thread and event loop, as in production.

    Not a task in the test's loop: on exit kopf.operator() cancels every task created after
    it started — that would include the mock server's connection handlers. Cluster-wide,
    because kmock 0.8 answers 500 to namespace listing.
    """
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=cluster.url)

    rt = register(registry, settings, kube_factory=lambda: Kube.for_host(cluster.url))
    kopf_settings = kopf.OperatorSettings()
    kopf_settings.persistence.consistency_timeout = 0.5  # kmock never bumps resourceVersion
    stop, ready = threading.Event(), threading.Event()
    operator = kopf.operator(
        registry=registry,
        settings=kopf_settings,
        clusterwide=True,
        standalone=True,
        stop_flag=stop,
        ready_flag=ready,
    )
    thread = threading.Thread(target=asyncio.run, args=(operator,), name="kopf-operator", daemon=True)
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, 10), "the operator did not start within 10s"
        yield rt
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 15)
        assert not thread.is_alive(), "the operator did not stop within 15s"


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll `check` until it returns something truthy; fail with its last value at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (KeyError, TypeError, StopIteration) as err:
            last = err
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what or check}: last={last!r}")
