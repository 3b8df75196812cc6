"""Helpers for tests/e2e/test_operator.py: FineTuneJob manifests, raw API calls, the Table view, the chart.

Nothing here imports the operator or the trainer: the e2e tests see the product only as a user does —
through the API server, the Helm chart, `kubectl get ftj` (the API's Table view) and /metrics.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, watch

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "finetune-operator"
CRD_DIR = CHART / "crds"
BAD_MANIFESTS = Path(__file__).resolve().parent / "bad_manifests"
CPU_DEMO = REPO / "examples" / "cpu-demo.yaml"

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
KIND = "FineTuneJob"
# The label the operator puts on the Job and its pods (the owner's uid: names may be reused).
OWNER_UID_LABEL = "finetune.dev/finetunejob-uid"
TABLE_ACCEPT = "application/json;as=Table;g=meta.k8s.io;v=v1"
TERMINAL = ("Succeeded", "Failed")


# ---------------------------------------------------------------- manifests


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged into a copy of `base` (dicts recursively; a None value deletes the key)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# examples/cpu-demo.yaml shrunk to seconds of CPU: 2 digit classes, 16 px, 2 epochs, a step per report.
SHRINK = {
    "dataset": {"imageSize": 16, "classes": ["0", "1"], "maxImagesPerClass": 96},
    "training": {"epochs": 2, "batchSize": 16, "logEverySteps": 1},
    "resources": {"cpu": "1", "memory": "1Gi"},
    "runPolicy": {"activeDeadlineSeconds": 600},
}


def tiny_job(name: str, spec: dict | None = None) -> dict:
    """examples/cpu-demo.yaml, shrunk (SHRINK), renamed, with `spec` merged in."""
    doc = yaml.safe_load(CPU_DEMO.read_text())
    doc["metadata"] = {"name": name}
    doc["spec"] = deep_merge(deep_merge(doc["spec"], SHRINK), spec or {})
    return doc


@dataclass
class BadManifest:
    """A manifest of tests/e2e/bad_manifests/.

    `# expect: <field>`: the field the schema error names, or (runtime outcomes) text that status.message holds.
    `# outcome: Failed <Reason>`: the schema accepts it and the FineTuneJob ends Failed with that reason;
    without the line the API server rejects it (`# status: <code>`, 422 by default).
    """

    path: Path
    body: dict
    field: str
    status: int = 422
    reason: str | None = None  # the status.reason of a runtime failure; None: rejected by the schema

    @property
    def id(self) -> str:
        return self.path.stem


def bad_manifests() -> list[BadManifest]:
    out = []
    for path in sorted(BAD_MANIFESTS.glob("*.yaml")):
        text = path.read_text()
        fields = re.findall(r"^# expect: *(.+?) *$", text, re.M)
        status = re.findall(r"^# status: *(\d+) *$", text, re.M)
        outcome = re.findall(r"^# outcome: *Failed +(\w+) *$", text, re.M)
        assert len(fields) == 1, f"{path.name}: needs exactly one `# expect: <field>` line"
        out.append(BadManifest(path, yaml.safe_load(text), fields[0], int(status[0]) if status else 422,
                               outcome[0] if outcome else None))
    return out


# ---------------------------------------------------------------- raw API access


def raw(api: client.ApiClient, method: str, path: str, query: list | None = None, headers: dict | None = None,
        body: Any = None, timeout: float | tuple = 30.0) -> client.rest.RESTResponse:
    """One request with the client's credentials; the response is not checked (see `raw_json`).

    `body`: a dict for JSON content types (the client serializes it), a str for others (apply-patch+yaml).
    """
    hdrs = {"Accept": "application/json", **(headers or {})}
    m, url, h, b, pp = api.param_serialize(
        method, path, query_params=query or [], header_params=hdrs, body=body, auth_settings=["BearerToken"]
    )
    return api.call_api(m, url, h, b, pp, _request_timeout=timeout)


def raw_json(api: client.ApiClient, method: str, path: str, **kw) -> dict:
    resp = raw(api, method, path, **kw)
    data = resp.read()
    if not 200 <= resp.status < 300:
        raise client.ApiException(status=resp.status, reason=resp.reason, body=data.decode(errors="replace"))
    return json.loads(data) if data else {}


def server_side_apply(api: client.ApiClient, path: str, obj: dict, manager: str = "finetune-e2e") -> dict:
    """`kubectl apply --server-side --force-conflicts` of one object at `path` (its full resource path)."""
    return raw_json(
        api, "PATCH", path, query=[("fieldManager", manager), ("force", "true")],
        headers={"Content-Type": "application/apply-patch+yaml"}, body=json.dumps(obj),
    )


def apply_crds(api: client.ApiClient, timeout: float = 60.0) -> list[str]:
    """Apply charts/finetune-operator/crds/*.yaml and wait until each is Established."""
    names = []
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                name = doc["metadata"]["name"]
                server_side_apply(api, f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}", doc)
                names.append(name)
    ext = client.ApiextensionsV1Api(api)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conds):
                break
            assert time.monotonic() < deadline, f"CRD {name} not Established after {timeout:.0f} s: {conds}"
            time.sleep(0.2)
    return names


def ftj_path(namespace: str, name: str = "") -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    return f"{base}/{name}" if name else base


# ---------------------------------------------------------------- FineTuneJobs


class Jobs:
    """FineTuneJobs and their children in one namespace."""

    def __init__(self, api: client.ApiClient, namespace: str):
        self.api, self.ns = api, namespace
        self.co = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)

    def create(self, body: dict, **kw) -> dict:
        return self.co.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body, **kw)

    def get(self, name: str) -> dict | None:
        try:
            return self.co.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        except client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch(self, name: str, patch: dict) -> dict:
        return raw_json(self.api, "PATCH", ftj_path(self.ns, name),
                        headers={"Content-Type": "application/merge-patch+json"}, body=patch)

    def delete(self, name: str, propagation: str = "Background") -> None:
        try:
            self.co.delete_namespaced_custom_object(
                GROUP, VERSION, self.ns, PLURAL, name, propagation_policy=propagation
            )
        except client.ApiException as e:
            if e.status != 404:
                raise

    def status(self, name: str) -> dict:
        return (self.get(name) or {}).get("status") or {}

    def pods(self, ftj: dict) -> list:
        sel = f"{OWNER_UID_LABEL}={ftj['metadata']['uid']}"
        return self.core.list_namespaced_pod(self.ns, label_selector=sel).items

    def owned(self, ftj: dict) -> dict[str, list[str]]:
        """Names of the Jobs, ConfigMaps and Secrets whose ownerReferences name this FineTuneJob (by uid)."""
        uid = ftj["metadata"]["uid"]

        def mine(items):
            return [o.metadata.name for o in items if any(r.uid == uid for r in o.metadata.owner_references or [])]

        return {
            "Job": mine(self.batch.list_namespaced_job(self.ns).items),
            "ConfigMap": mine(self.core.list_namespaced_config_map(self.ns).items),
            "Secret": mine(self.core.list_namespaced_secret(self.ns).items),
        }

    def events(self, name: str) -> list:
        sel = f"involvedObject.kind={KIND},involvedObject.name={name}"
        return self.core.list_namespaced_event(self.ns, field_selector=sel).items

    def event_counts(self, name: str, uid: str | None = None) -> dict[tuple[str, str], int]:
        """{(type, reason): how many times} over this FineTuneJob's events (aggregated counts included)."""
        out: dict[tuple[str, str], int] = {}
        for ev in self.events(name):
            if uid and ev.involved_object.uid and ev.involved_object.uid != uid:
                continue
            n = ev.count or (ev.series.count if ev.series else 0) or 1
            out[(ev.type, ev.reason)] = out.get((ev.type, ev.reason), 0) + n
        return out

    def table(self, name: str | None = None) -> list[dict[str, Any]]:
        """What `kubectl get ftj -o wide` prints: one {column name: cell} per row (the API's Table view)."""
        query = [("fieldSelector", f"metadata.name={name}")] if name else []
        return table_rows(raw_json(self.api, "GET", ftj_path(self.ns), query=query,
                                   headers={"Accept": TABLE_ACCEPT}))


def table_rows(table: dict, cols: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows as {column: cell}; `cols` for watch events after the first (the server sends the columns once)."""
    cols = [c["name"] for c in table.get("columnDefinitions") or []] or cols or []
    return [dict(zip(cols, row.get("cells") or [], strict=False)) for row in table.get("rows") or []]


class JobWatch(threading.Thread):
    """Every Job ADDED in the namespace while it runs (a watch sees what a later list would not)."""

    def __init__(self, api: client.ApiClient, namespace: str):
        super().__init__(daemon=True)
        self.batch, self.ns = client.BatchV1Api(api), namespace
        self.added: dict[str, tuple[str, list[str]]] = {}  # uid -> (name, owner uids)
        self.watch = watch.Watch()
        self.ready, self.stopped = threading.Event(), threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        version = self.batch.list_namespaced_job(self.ns).metadata.resource_version
        self.ready.set()
        while not self.stopped.is_set():
            try:  # resumed from the last version seen: a dropped connection loses no event
                for ev in self.watch.stream(self.batch.list_namespaced_job, self.ns, resource_version=version,
                                            timeout_seconds=60):
                    meta = ev["object"].metadata
                    version = meta.resource_version
                    if ev["type"] == "ADDED":
                        self.added[meta.uid] = (meta.name, [r.uid for r in meta.owner_references or []])
            except Exception as e:  # anything but a stop is recorded, then the watch resumes
                if not self.stopped.is_set():
                    self.errors.append(repr(e))
                    time.sleep(0.5)

    def stop(self) -> None:
        self.stopped.set()
        self.watch.stop()
        self.join(timeout=65)

    def owned_by(self, uid: str) -> list[tuple[str, str]]:
        return [(name, job_uid) for job_uid, (name, owners) in self.added.items() if uid in owners]


def wait_phase(jobs: Jobs, name: str, phases: tuple[str, ...], timeout: float, operator_logs=None,
               give_up=None) -> dict:
    """Wait until the FineTuneJob's phase is one of `phases`; fail with its status (and operator log) if not.

    `give_up()`: a reason to stop waiting early (e.g. the operator got a 403), checked every few seconds.
    """
    deadline = time.monotonic() + timeout
    last: dict = {}
    next_check = time.monotonic() + 2
    while time.monotonic() < deadline:
        obj = jobs.get(name)
        last = (obj or {}).get("status") or {}
        if last.get("phase") in phases:
            return obj
        if last.get("phase") in TERMINAL:  # finished, but not as wanted: no point waiting
            break
        if give_up is not None and time.monotonic() >= next_check:
            reason = give_up()
            if reason:
                raise AssertionError(
                    f"FineTuneJob {jobs.ns}/{name}: phase {last.get('phase')!r} reason {last.get('reason')!r}; "
                    f"stopped waiting for {'/'.join(phases)}: {reason}")
            next_check = time.monotonic() + 3
        time.sleep(0.3)
    extra = f"\noperator log tail:\n{operator_logs()}" if operator_logs else ""
    raise AssertionError(
        f"FineTuneJob {jobs.ns}/{name}: wanted phase {'/'.join(phases)} within {timeout:.0f} s, got "
        f"{last.get('phase')!r} reason {last.get('reason')!r}: {last.get('message')!r}{extra}"
    )


@dataclass
class TableWatch:
    """`kubectl get ftj NAME -o wide -w` in a thread: every Table row the API server sends, with its time.

    A watch (not polling) so that no status update between two polls is missed however fast the trainer is.
    """

    api: client.ApiClient
    namespace: str
    name: str
    rows: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _resp: Any = None

    def __enter__(self) -> TableWatch:
        self._thread = threading.Thread(target=self._run, name=f"table-watch {self.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._resp is not None:
            try:
                self._resp.response.shutdown() if hasattr(self._resp.response, "shutdown") else None
                self._resp.response.release_conn()
            except Exception:
                pass
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        rv, cols = None, None
        while not self._stop.is_set():
            query = [("watch", "true"), ("fieldSelector", f"metadata.name={self.name}"), ("timeoutSeconds", "60"),
                     ("allowWatchBookmarks", "false")]
            if rv:
                query.append(("resourceVersion", rv))
            try:
                self._resp = raw(self.api, "GET", ftj_path(self.namespace), query=query,
                                 headers={"Accept": TABLE_ACCEPT}, timeout=(10, 90))
                if self._resp.status != 200:
                    self.error = f"watch answered {self._resp.status}: {self._resp.read()[:300]!r}"
                    return
                for line in _lines(self._resp.response):
                    if self._stop.is_set():
                        return
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        rv = None  # e.g. 410 Gone: start over
                        break
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    cols = [c["name"] for c in obj.get("columnDefinitions") or []] or cols
                    for row in table_rows(obj, cols):
                        self.rows.append((time.time(), row))
            except Exception as e:
                if self._stop.is_set():
                    return
                self.error = f"{type(e).__name__}: {e}"
                time.sleep(0.5)

    def describe(self) -> str:
        return "\n".join(
            " ".join(f"{k}={v}" for k, v in row.items() if k in ("Name", "Phase", "Epoch", "Loss", "Val-Acc", "ETA",
                                                              "Reason"))
            for _, row in self.rows
        ) or "(no rows)"


def _lines(resp) -> Iterator[bytes]:
    buf = b""
    for chunk in resp.stream(4096, decode_content=True):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line


# ---------------------------------------------------------------- the chart and the operator


def helm(helm_bin: str, kubeconfig: str, *args: str, timeout: float = 180.0) -> str:
    proc = subprocess.run([helm_bin, "--kubeconfig", kubeconfig, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric `name` in Prometheus text format: [(labels, value)]."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? +(\S+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
            out.append((labels, float(m.group(2))))
    return out
