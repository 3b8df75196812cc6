#!/usr/bin/env python3
"""A test-side "kubelet" for the local e2e cluster: runs the pods bound to its node as local processes.

kwok keeps the node Ready (heartbeats, lease) but plays no stage for pods on this node; this runner owns
their status, like a kubelet (Python standard library only, so any python3 runs it):

* watches pods with ``spec.nodeName=<node>`` (as the node: ``system:node:<node>`` credentials, so the Node
  authorizer and NodeRestriction apply for real);
* runs init containers in order (``restartPolicy: Always`` init containers as sidecars), then every main
  container, each as ``bwrap`` (bubblewrap) sandbox: private mount + PID namespace, host network;
* maps volumes to directories under its work dir (configMap, secret, downwardAPI, projected — including
  serviceAccountToken from the TokenRequest API, bound to the pod — emptyDir, persistentVolumeClaim: one
  directory per claim that outlives pods); hostPath and other volume types are refused (pod Failed);
* bind-mounts them on the container's mountPaths (subPath, readOnly honoured) in a root built of bind
  mounts of the host's top-level entries, so missing mountpoints (``/output``, ``/etc/finetune``) are
  created in the sandbox's tmpfs, never on the host; ``readOnlyRootFilesystem`` makes that root read-only;
* runs the process as ``runAsUser``/``runAsGroup`` (+ ``fsGroup``, ``supplementalGroups``) via setpriv,
  without capabilities for non-root users or when ``capabilities.drop`` has ALL;
* env: value (``$(VAR)`` expansion), envFrom, fieldRef / resourceFieldRef (downward API),
  configMapKeyRef, secretKeyRef; ``host:port`` in env values and args that names a Service
  (``svc``, ``svc.ns``, ``svc.ns.svc``, ``svc.ns.svc.cluster.local``) becomes ``127.0.0.1:<targetPort>``
  of its backing pod (there is no DNS and no pod network: every process shares the host network, so two
  pods can't listen on one port); ``KUBERNETES_SERVICE_HOST/PORT`` point at the API server; the pod's
  hostname and, for pods with a ``subdomain`` (Indexed Job workers), their siblings' DNS names
  ``<job>-<i>.<subdomain>…`` resolve to 127.0.0.1 through the sandbox's own /etc/hosts;
* status through the status subresource: Pending → Running (startTime, containerStatuses, conditions
  PodReadyToStartContainers/Initialized/ContainersReady/Ready/PodScheduled, readiness probes httpGet and
  tcpSocket) → Succeeded/Failed with ``state.terminated`` (exitCode, reason, message from the
  ``terminationMessagePath`` file or the log tail with FallbackToLogsOnError, startedAt, finishedAt);
  restartPolicy Never/OnFailure/Always (restart backoff 1 s doubling to 10 s), ``activeDeadlineSeconds``;
* deletion: SIGTERM to the container's process group, SIGKILL after the grace period, terminal phase
  written, then the pod is deleted with grace 0 (as a kubelet does);
* logs: ``<logs>/<namespace>_<pod>_<container>.log`` (stdout and stderr, appended across restarts);
* a tiny PV provisioner: StorageClass ``standard`` (default, ``finetune.dev/runner``, Immediate): a PVC
  of that class gets a PV (hostPath = its directory, for display only), deleted when released.

Not done: liveness/startup probes, exec/grpc readiness probes (count as ready), lifecycle hooks,
``kubectl logs/exec`` (no kubelet API: read the log files), images (the image's ENTRYPOINT is unknown:
``command``, else ``args[0]``, is the executable; ``finetune-train``, ``finetune-operator``, ``python`` and
``python3`` run from the repository's ``.venv/bin``), resource limits, service links (``FOO_SERVICE_HOST``),
token refresh (tokens are valid for an hour or more, longer than a test).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import math
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
from pathlib import Path

PROVISIONER = "finetune.dev/runner"
STORAGE_CLASS = "standard"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
VENV_ENTRYPOINTS = ("finetune-train", "finetune-operator", "python", "python3")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BACKOFF_BASE, BACKOFF_MAX = 1.0, 10.0
TERMINATED = ("Succeeded", "Failed")


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [runner] {msg}", file=sys.stderr, flush=True)


def now_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t if t is not None else time.time()))


class ApiError(Exception):
    def __init__(self, status: int, body):
        self.status, self.body = status, body
        msg = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"HTTP {status}: {msg}")


class RetryLater(Exception):
    """A pod cannot start yet (missing ConfigMap, 403 from a lagging Node authorizer graph, ...)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


class Refused(Exception):
    """The pod cannot run on this runner at all (hostPath, unsupported volume type, ...)."""


# ---------------------------------------------------------------------------------------------- API
class Api:
    """Minimal JSON client over one keep-alive HTTPS connection (one per thread)."""

    def __init__(self, server: str, ca: str, cert: str, key: str):
        u = urllib.parse.urlsplit(server)
        self.host, self.port = u.hostname, u.port
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.load_cert_chain(cert, key)
        self.conn: http.client.HTTPSConnection | None = None

    def connect(self, timeout: float | None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout)

    def request(self, method: str, path: str, body=None, content_type: str = "application/json", ok=(200, 201)):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in range(3):
            if self.conn is None:
                self.conn = self.connect(15)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                break
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.1)
        try:
            obj = json.loads(raw) if raw else {}
        except ValueError:
            obj = raw.decode(errors="replace")
        if resp.status not in ok:
            raise ApiError(resp.status, obj)
        return obj

    def get(self, path: str, missing_ok: bool = False):
        try:
            return self.request("GET", path)
        except ApiError as e:
            if missing_ok and e.status == 404:
                return None
            raise


def q(**params) -> str:
    return "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})


# ---------------------------------------------------------------------------------------------- helpers
_SUFFIX = {
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def quantity(s) -> float:
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", str(s).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"bad quantity {s!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined variables are replaced, $$ escapes, unknown refs stay."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and (j := text.find(")", i + 2)) != -1:
            name = text[i + 2 : j]
            out.append(env[name] if name in env else text[i : j + 1])
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def read_tail(path: Path, max_bytes: int, max_lines: int, start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(start, size - max_bytes))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-max_lines:])


def _field_path(pod: dict, path: str, node: str) -> str:
    md = pod["metadata"]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return (md.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": md.get("name", ""),
        "metadata.namespace": md.get("namespace", ""),
        "metadata.uid": md.get("uid", ""),
        "spec.nodeName": pod["spec"].get("nodeName") or node,
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
        "status.podIP": "127.0.0.1",
        "status.podIPs": "127.0.0.1",
    }
    if path in simple:
        return simple[path]
    if path in ("metadata.labels", "metadata.annotations"):
        items = md.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise Refused(f"unsupported fieldRef.fieldPath {path!r}")


def _resource_field(pod: dict, ref: dict, default_container: str | None) -> str:
    name = ref.get("containerName") or default_container
    cont = next(
        (c for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []) if c["name"] == name), None
    )
    res = (cont or {}).get("resources") or {}
    kind, _, what = ref["resource"].partition(".")
    value = (res.get(kind) or {}).get(what)
    if value is None and kind == "requests":
        value = (res.get("limits") or {}).get(what)
    if value is None:
        if kind == "limits":  # unset limit: node allocatable
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            value = {"cpu": os.cpu_count() or 1, "memory": mem}.get(what, 0)
        else:
            value = 0
    divisor = quantity(ref.get("divisor") or "1")
    return str(math.ceil(quantity(value) / divisor))


def _exit_reason(code: int) -> str:
    return "Completed" if code == 0 else "Error"


def _has_children(pid: int) -> bool:
    """True once the sandbox's PID 1 (bwrap's init) has forked the container's command."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                return True
    return False


# ---------------------------------------------------------------------------------------------- container
class Container:
    def __init__(self, spec: dict, kind: str):
        self.spec, self.name, self.kind = spec, spec["name"], kind  # kind: init | sidecar | main
        self.proc: subprocess.Popen | None = None
        self.init_pid = 0  # host PID of the sandbox's PID 1 (= the container's process group)
        self.started_at = 0.0
        self.restarts = 0
        self.state: dict = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict = {}
        self.exit_code: int | None = None
        self.next_start = 0.0  # earliest restart time
        self.ready = False
        self.last_probe = 0.0
        self.log_offset = 0
        self.term_sent = False

    @property
    def running(self) -> bool:
        return self.proc is not None

    @property
    def done(self) -> bool:
        """Terminated and will not run again."""
        return self.proc is None and self.exit_code is not None and self.next_start == 0.0


# ---------------------------------------------------------------------------------------------- pod
class PodRun:
    def __init__(self, runner: Runner, pod: dict):
        self.r = runner
        self.pod = pod
        md = pod["metadata"]
        self.ns, self.name, self.uid = md["namespace"], md["name"], md["uid"]
        self.dir = runner.workdir / "pods" / f"{self.ns}_{self.name}_{self.uid[:8]}"
        spec = pod["spec"]
        self.policy = spec.get("restartPolicy", "Always")
        self.containers = [
            Container(c, "sidecar" if c.get("restartPolicy") == "Always" else "init")
            for c in spec.get("initContainers", [])
        ] + [Container(c, "main") for c in spec["containers"]]
        self.volumes: dict[str, Path] | None = None
        self.start_time = time.time()
        self.reason = self.message = ""
        self.terminating = False  # processes are being stopped (deletion, deadline, failure)
        self.kill_at = 0.0
        self.deleted = False  # deletionTimestamp seen
        self.removed = False  # DELETE sent (or the pod is gone)
        self.phase = "Pending"
        self.failed_start: str = ""
        self.published: str | None = None  # the last status the API server took (JSON)
        self.published_final = False  # ... and it was the terminal one (an outage may have dropped that write)
        self.next_setup = 0.0
        self.waiting_reason: tuple[str, str] = ("ContainerCreating", "")
        self.killed = False
        self.adopted = False  # a finished pod seen only to complete its deletion: its status is not ours

    # ------------------------------------------------------------------ lifecycle
    def update(self, pod: dict) -> None:
        self.pod = pod
        md = pod["metadata"]
        if md.get("deletionTimestamp") and not self.deleted:
            self.deleted = True
            grace = md.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            log(f"{self.ns}/{self.name}: deleted (grace {grace} s)")
            self.stop(float(grace))

    def stop(self, grace: float) -> None:
        """SIGTERM every running container's process group; SIGKILL after `grace` seconds."""
        now = time.time()
        if not self.terminating:
            self.terminating = True
            self.kill_at = now + grace
        else:
            self.kill_at = min(self.kill_at, now + grace)
        for c in self.containers:
            c.next_start = 0.0
            self._sigterm(c)
        if grace <= 0:
            self.kill_all()

    @staticmethod
    def _sigterm(c: Container) -> None:
        """SIGTERM the container's process group; retried by step() while the sandbox is still starting
        (until bwrap's setsid the group does not exist yet)."""
        if c.running and not c.term_sent and _has_children(c.init_pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.init_pid, signal.SIGTERM)
                c.term_sent = True

    def kill_all(self) -> None:
        for c in self.containers:
            if c.running:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(c.init_pid, signal.SIGKILL)  # PID 1 of the namespace: takes everything in it
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()

    def gone(self) -> None:
        """The pod object is gone from the API: kill what runs, forget it."""
        self.removed = True
        if any(c.running for c in self.containers):
            self.terminating = True
            self.kill_all()
            for c in self.containers:
                if c.running:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        c.proc.wait(5)
                    self._exited(c, c.proc.returncode if c.proc.returncode is not None else 137)

    # ------------------------------------------------------------------ step
    def step(self, now: float) -> None:
        if self.phase in TERMINATED and self.published_final and not self.deleted:
            return  # finished; nothing to do until it is deleted
        for c in self.containers:
            if c.running and c.proc.poll() is not None:
                self._exited(c, c.proc.returncode)
        if self.terminating:
            for c in self.containers:
                self._sigterm(c)
        if self.terminating and now >= self.kill_at and not self.killed and any(c.running for c in self.containers):
            log(f"{self.ns}/{self.name}: grace period over, SIGKILL")
            self.killed = True
            self.kill_all()
        if self.removed:
            return
        ads = self.pod["spec"].get("activeDeadlineSeconds")
        if ads is not None and not self.terminating and self.phase not in TERMINATED and now - self.start_time > ads:
            self.reason, self.message = (
                "DeadlineExceeded",
                (f"Pod was active on the node longer than the specified deadline ({ads} s)"),
            )
            self.stop(float(self.pod["spec"].get("terminationGracePeriodSeconds", 30)))
        if not self.terminating and self.phase not in TERMINATED:
            self._advance(now)
        self._probe(now)
        self._compute_phase()
        self.publish()
        if self.deleted and not any(c.running for c in self.containers) and not self.removed:
            self._remove()

    def _advance(self, now: float) -> None:
        if self.volumes is None:
            if now < self.next_setup:
                return
            try:
                self.volumes = self.r.volumes.setup(self)
            except RetryLater as e:
                self.waiting_reason = (e.reason, str(e))
                self.next_setup = now + 1.0
                return
            except Refused as e:
                self._refuse(str(e))
                return
        # init containers, in order
        for c in self.containers:
            if c.kind == "main":
                break
            if c.kind == "sidecar":
                if not c.running and c.next_start <= now and not self.terminating:
                    self._start(c)
                if not c.running and c.exit_code is None:
                    return  # a sidecar that could not start blocks the next containers
                continue
            if c.exit_code == 0 and not c.running:
                continue
            if not c.running and (c.exit_code is None or c.next_start) and c.next_start <= now:
                self._start(c)
            return  # this init container runs (or waits for its restart)
        mains = [c for c in self.containers if c.kind == "main"]
        for c in mains:
            if not c.running and (c.exit_code is None or c.next_start) and c.next_start <= now:
                self._start(c)
        if all(c.done for c in mains):
            for c in self.containers:  # sidecars end with the main containers
                if c.kind == "sidecar" and c.running:
                    self._sigterm(c)
                    self.terminating = True
                    self.kill_at = now + float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def _start(self, c: Container) -> None:
        try:
            self.r.launcher.start(self, c)
        except RetryLater as e:
            c.state = {"waiting": {"reason": e.reason, "message": str(e)}}
            c.next_start = time.time() + 1.0
        except Refused as e:
            self._refuse(str(e))

    def _refuse(self, message: str) -> None:
        log(f"{self.ns}/{self.name}: refused: {message}")
        self.reason, self.message = "UnsupportedByTestRunner", message
        self.failed_start = message
        self.terminating = True
        for c in self.containers:
            c.next_start = 0.0
            if not c.running and c.exit_code is None:
                c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}

    def _exited(self, c: Container, rc: int) -> None:
        finished = time.time()
        code = rc if rc >= 0 else 128 - rc
        reason = _exit_reason(code)
        log_path = self.r.log_path(self, c)
        segment = read_tail(log_path, 4096, 20, start=c.log_offset)
        if code == 1 and segment.startswith("bwrap: "):  # the sandbox could not start the command
            code, reason = 128, "StartError"
        message = self.r.launcher.termination_message(self, c, code, segment if reason == "StartError" else None)
        term = {"exitCode": code, "reason": reason, "startedAt": now_iso(c.started_at), "finishedAt": now_iso(finished),
                "containerID": f"runner://{c.proc.pid}"}  # fmt: skip
        if message:
            term["message"] = message
        log(f"{self.ns}/{self.name}/{c.name}: exited {code} ({reason}) after {finished - c.started_at:.1f} s")
        c.proc = None
        c.init_pid = 0
        c.exit_code = code
        c.ready = False
        c.state = {"terminated": term}
        self.r.save_procs()
        restart = not self.terminating and (
            (c.kind == "sidecar")
            or (self.policy == "Always" and c.kind == "main")
            or (self.policy in ("Always", "OnFailure") and code != 0)
        )
        if restart:
            c.next_start = finished + min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(c.restarts, 10))
            c.last_state = {"terminated": term}
            c.restarts += 1
            c.state = {"waiting": {"reason": "CrashLoopBackOff" if code else "Completed",
                                   "message": f"back-off restarting container {c.name}"}}  # fmt: skip
        else:
            c.next_start = 0.0
            if c.kind == "init" and code != 0:  # restartPolicy Never: the pod fails
                self.terminating = True
                self.kill_at = finished

    # ------------------------------------------------------------------ probes
    def _probe(self, now: float) -> None:
        for c in self.containers:
            if not c.running:
                c.ready = False
                continue
            probe = c.spec.get("readinessProbe")
            if not probe or ("httpGet" not in probe and "tcpSocket" not in probe):
                c.ready = True
                continue
            period = min(float(probe.get("periodSeconds", 10)), 1.0)
            if now - c.last_probe < (0.2 if not c.ready else period):
                continue
            c.last_probe = now
            c.ready = self._probe_once(c, probe)

    def _port(self, c: Container, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports", []):
            if p.get("name") == port:
                return int(p["containerPort"])
        return 0

    def _probe_once(self, c: Container, probe: dict) -> bool:
        timeout = min(float(probe.get("timeoutSeconds", 1)), 1.0)
        try:
            if "tcpSocket" in probe:
                with socket.create_connection(("127.0.0.1", self._port(c, probe["tcpSocket"]["port"])), timeout):
                    return True
            get = probe["httpGet"]
            port = self._port(c, get["port"])
            if get.get("scheme", "HTTP").upper() == "HTTPS":
                conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                                   context=ssl._create_unverified_context())  # fmt: skip
            else:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            try:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
                conn.request("GET", get.get("path", "/"), headers=headers)
                resp = conn.getresponse()
                resp.read()
                return 200 <= resp.status < 400
            finally:
                conn.close()
        except (OSError, http.client.HTTPException):
            return False

    # ------------------------------------------------------------------ status
    def _compute_phase(self) -> None:
        if self.phase in TERMINATED:
            return
        mains = [c for c in self.containers if c.kind == "main"]
        if any(c.running for c in self.containers):
            if any(c.running or c.exit_code is not None for c in mains):
                self.phase = "Running"
            return
        init_failed = any(c.kind == "init" and c.done and c.exit_code != 0 for c in self.containers)
        if self.failed_start or init_failed:
            self.phase = "Failed"
        elif all(c.done for c in mains):
            self.phase = "Succeeded" if all(c.exit_code == 0 for c in mains) else "Failed"
        elif self.terminating:  # stopped (deletion, deadline) before every container finished
            self.phase = "Failed"
        elif any(c.exit_code is not None for c in mains):
            self.phase = "Running"  # waiting for a restart
        if self.phase in TERMINATED:
            log(f"{self.ns}/{self.name}: {self.phase}")
            self.r.volumes.teardown(self)

    def status(self) -> dict:
        old = {c["type"]: c for c in (self.pod.get("status") or {}).get("conditions") or []}
        mains = [c for c in self.containers if c.kind == "main"]
        terminal = self.phase in TERMINATED
        inits_done = all(c.kind != "init" or (c.exit_code == 0 and not c.running) for c in self.containers)
        ready = not terminal and all(c.ready for c in mains)
        reason = "PodCompleted" if terminal else ("ContainersNotReady" if not ready else "")
        conds = {
            "PodReadyToStartContainers": (self.volumes is not None and not terminal, ""),
            "Initialized": (inits_done, "" if inits_done else "ContainersNotInitialized"),
            "ContainersReady": (ready, reason),
            "Ready": (ready, reason),
        }
        out = []
        for ctype, (ok, why) in conds.items():
            status = "True" if ok else "False"
            prev = old.get(ctype)
            cond = {"type": ctype, "status": status,
                    "lastTransitionTime": prev["lastTransitionTime"] if prev and prev.get("status") == status
                    and prev.get("lastTransitionTime") else now_iso()}  # fmt: skip
            if why and not ok:
                cond["reason"] = why
            out.append(cond)
        out += [c for t, c in old.items() if t not in conds]  # PodScheduled, DisruptionTarget, ...

        def cstatus(c: Container) -> dict:
            state = c.state
            if "waiting" in state and state["waiting"].get("reason") == "ContainerCreating" and self.volumes is None:
                state = {"waiting": {"reason": self.waiting_reason[0], "message": self.waiting_reason[1]}}
                if not state["waiting"]["message"]:
                    del state["waiting"]["message"]
            s = {"name": c.name, "image": c.spec.get("image", ""), "imageID": f"runner://{c.spec.get('image', '')}",
                 "ready": c.ready, "restartCount": c.restarts, "started": c.running, "state": state,
                 "lastState": c.last_state}  # fmt: skip
            if c.running:
                s["containerID"] = f"runner://{c.proc.pid}"
            elif "terminated" in state:
                s["containerID"] = state["terminated"].get("containerID")
            return s

        st = {
            "phase": self.phase,
            "conditions": out,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": now_iso(self.start_time),
            "qosClass": (self.pod.get("status") or {}).get("qosClass"),
            "containerStatuses": [cstatus(c) for c in mains],
            "observedGeneration": self.pod["metadata"].get("generation"),
        }
        inits = [cstatus(c) for c in self.containers if c.kind != "main"]
        if inits:
            st["initContainerStatuses"] = inits
        if self.reason:
            st["reason"], st["message"] = self.reason, self.message
        return st

    def publish(self) -> None:
        if self.adopted:
            return
        st = {k: v for k, v in self.status().items() if v is not None}
        cmp = json.dumps(st, sort_keys=True)
        if cmp == self.published:
            return
        try:
            obj = self.r.api.request(
                "PATCH", f"/api/v1/namespaces/{self.ns}/pods/{self.name}/status",
                {"metadata": {"uid": self.uid}, "status": st}, content_type="application/merge-patch+json",
            )  # fmt: skip
            self.published, self.published_final = cmp, self.phase in TERMINATED
            self.pod = obj
        except ApiError as e:
            if e.status in (404, 409):  # gone, or replaced by a pod of the same name
                self.published, self.published_final = cmp, self.phase in TERMINATED
            else:
                log(f"{self.ns}/{self.name}: status update failed: {e}")
        except OSError as e:
            log(f"{self.ns}/{self.name}: status update failed: {e}")

    def _remove(self) -> None:
        """The pod is deleted and its processes are gone: finish the deletion, as a kubelet does."""
        self.removed = True
        self.r.volumes.teardown(self)
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": self.uid}}  # fmt: skip
        try:
            self.r.api.request("DELETE", f"/api/v1/namespaces/{self.ns}/pods/{self.name}", body, ok=(200, 202))
            log(f"{self.ns}/{self.name}: removed")
        except ApiError as e:
            if e.status not in (404, 409):
                log(f"{self.ns}/{self.name}: delete failed: {e}")
                self.removed = False


# ---------------------------------------------------------------------------------------------- volumes
class Volumes:
    def __init__(self, runner: Runner):
        self.r = runner

    def pvc_dir(self, ns: str, claim: str) -> Path:
        return self.r.workdir / "pvc" / ns / claim

    def _get(self, pr: PodRun, kind: str, name: str, optional: bool):
        try:
            obj = self.r.api.get(f"/api/v1/namespaces/{pr.ns}/{kind}/{name}", missing_ok=True)
        except ApiError as e:
            if e.status == 403:  # the Node authorizer's graph has not seen this pod yet
                raise RetryLater("ContainerCreating", f"{kind} {name!r}: {e}") from e
            raise
        if obj is None and not optional:
            raise RetryLater("CreateContainerConfigError" if kind else "ContainerCreating",
                             f"{kind[:-1]} {name!r} not found")  # fmt: skip
        return obj

    @staticmethod
    def _data(kind: str, obj: dict | None) -> dict[str, bytes]:
        if obj is None:
            return {}
        if kind == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        out = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return out

    def _write(self, root: Path, rel: str, data: bytes, mode: int, uid: int | None = None, gid: int | None = None):
        path = root / rel
        if ".." in Path(rel).parts or rel.startswith("/"):
            raise Refused(f"bad volume item path {rel!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode & 0o777)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)

    def _keys(self, pr: PodRun, root: Path, kind: str, src: dict, default_mode: int, gid: int | None):
        name = src.get("name", "")
        obj = self._get(pr, kind, name, bool(src.get("optional")))
        data = self._data(kind, obj)
        items = src.get("items")
        if items:
            for it in items:
                if it["key"] not in data:
                    if src.get("optional"):
                        continue
                    raise RetryLater("CreateContainerConfigError", f"key {it['key']!r} not in {kind[:-1]} {name!r}")
                self._write(root, it["path"], data[it["key"]], it.get("mode", default_mode), gid=gid)
        else:
            for k, v in data.items():
                self._write(root, k, v, default_mode, gid=gid)

    def _downward(self, pr: PodRun, root: Path, items: list, default_mode: int, gid: int | None):
        for it in items:
            if "fieldRef" in it:
                value = _field_path(pr.pod, it["fieldRef"]["fieldPath"], self.r.node)
            else:
                value = _resource_field(pr.pod, it["resourceFieldRef"], None)
            self._write(root, it["path"], value.encode(), it.get("mode", default_mode), gid=gid)

    def token(self, pr: PodRun, audience: str | None, seconds: int) -> str:
        sa = pr.pod["spec"].get("serviceAccountName") or "default"
        bound = {"apiVersion": "v1", "kind": "Pod", "name": pr.name, "uid": pr.uid}
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [audience] if audience else None, "expirationSeconds": seconds,
                         "boundObjectRef": bound}}  # fmt: skip
        try:
            obj = self.r.api.request("POST", f"/api/v1/namespaces/{pr.ns}/serviceaccounts/{sa}/token", body)
        except ApiError as e:
            if e.status in (403, 404):
                raise RetryLater("ContainerCreating", f"token for serviceaccount {sa!r}: {e}") from e
            raise
        return obj["status"]["token"]

    def setup(self, pr: PodRun) -> dict[str, Path]:
        """Materialize every volume of the pod: {volume name: host path}."""
        spec, psc = pr.pod["spec"], pr.pod["spec"].get("securityContext") or {}
        fs_group = psc.get("fsGroup")
        root = pr.dir / "volumes"
        out: dict[str, Path] = {}
        for vol in spec.get("volumes", []):
            name = vol["name"]
            kinds = [k for k in vol if k != "name"]
            kind = kinds[0] if kinds else "emptyDir"
            src = vol.get(kind) or {}
            path = root / name
            if path.exists() and kind != "persistentVolumeClaim":
                shutil.rmtree(path)
            if kind == "emptyDir":
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o777)
            elif kind in ("configMap", "secret"):
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o755)
                mode = src.get("defaultMode", 0o644)
                srcn = dict(src, name=src.get("name") if kind == "configMap" else src.get("secretName"))
                self._keys(pr, path, "configmaps" if kind == "configMap" else "secrets", srcn, mode, fs_group)
            elif kind == "downwardAPI":
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o755)
                self._downward(pr, path, src.get("items", []), src.get("defaultMode", 0o644), fs_group)
            elif kind == "projected":
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o755)
                mode = src.get("defaultMode", 0o644)
                for s in src.get("sources", []):
                    if "configMap" in s:
                        self._keys(pr, path, "configmaps", s["configMap"], mode, fs_group)
                    elif "secret" in s:
                        self._keys(pr, path, "secrets", s["secret"], mode, fs_group)
                    elif "downwardAPI" in s:
                        self._downward(pr, path, s["downwardAPI"].get("items", []), mode, fs_group)
                    elif "serviceAccountToken" in s:
                        t = s["serviceAccountToken"]
                        token = self.token(pr, t.get("audience"), int(t.get("expirationSeconds", 3600)))
                        uid = self._pod_uid(pr)
                        # As the kubelet: 0600 owned by the (single) runAsUser, else the default mode.
                        self._write(path, t["path"], token.encode(), 0o600 if uid else mode, uid=uid or None,
                                    gid=fs_group)  # fmt: skip
                    else:
                        raise Refused(f"volume {name!r}: unsupported projected source {sorted(s)}")
            elif kind == "persistentVolumeClaim":
                path = self.pvc_dir(pr.ns, src["claimName"])
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o777)
            elif kind == "hostPath":
                raise Refused(f"volume {name!r}: hostPath volumes are refused by the test runner")
            else:
                raise Refused(f"volume {name!r}: volume type {kind!r} is not supported by the test runner")
            out[name] = path
        return out

    @staticmethod
    def _pod_uid(pr: PodRun) -> int:
        psc = pr.pod["spec"].get("securityContext") or {}
        uids = {
            (c.get("securityContext") or {}).get("runAsUser", psc.get("runAsUser", 0))
            for c in pr.pod["spec"]["containers"]
        }
        return uids.pop() if len(uids) == 1 else 0

    def teardown(self, pr: PodRun) -> None:
        """Remove the pod's own volumes (PVC directories stay: they belong to the claim)."""
        if not self.r.keep_pods:
            shutil.rmtree(pr.dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- launcher
class Launcher:
    def __init__(self, runner: Runner):
        self.r = runner
        self.bwrap = shutil.which("bwrap") or "bwrap"
        self.setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"

    # ------------------------------------------------------------------ env, command
    def env(self, pr: PodRun, c: Container) -> dict[str, str]:
        pod, spec = pr.pod, c.spec
        port = self.r.api_port
        env = {
            "PATH": DEFAULT_PATH,
            "HOSTNAME": pod["spec"].get("hostname") or pr.name,
            "HOME": "/root",
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
            "KUBERNETES_PORT": f"tcp://127.0.0.1:{port}",
            f"KUBERNETES_PORT_{port}_TCP": f"tcp://127.0.0.1:{port}",
        }
        for ef in spec.get("envFrom", []):
            prefix = ef.get("prefix", "")
            for kind, key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
                if key in ef:
                    obj = self.r.volumes._get(pr, kind, ef[key]["name"], bool(ef[key].get("optional")))
                    for k, v in self.r.volumes._data(kind, obj).items():
                        env[prefix + k] = v.decode(errors="replace")
        for e in spec.get("env", []):
            name = e["name"]
            if "valueFrom" not in e:
                env[name] = expand(e.get("value", ""), env)
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                env[name] = _field_path(pod, vf["fieldRef"]["fieldPath"], self.r.node)
            elif "resourceFieldRef" in vf:
                env[name] = _resource_field(pod, vf["resourceFieldRef"], c.name)
            else:
                kind, ref = (
                    ("configmaps", vf["configMapKeyRef"])
                    if "configMapKeyRef" in vf
                    else ("secrets", vf["secretKeyRef"])
                )
                obj = self.r.volumes._get(pr, kind, ref["name"], bool(ref.get("optional")))
                data = self.r.volumes._data(kind, obj)
                if ref["key"] in data:
                    env[name] = data[ref["key"]].decode(errors="replace")
                elif not ref.get("optional"):
                    raise RetryLater(
                        "CreateContainerConfigError", f"couldn't find key {ref['key']} in {kind[:-1]} {ref['name']}"
                    )
        return {k: self.r.services.rewrite(v, pr.ns) for k, v in env.items()}

    def command(self, pr: PodRun, c: Container, env: dict[str, str]) -> list[str]:
        cmd = [expand(a, env) for a in c.spec.get("command") or []]
        args = [expand(a, env) for a in c.spec.get("args") or []]
        argv = [self.r.services.rewrite(a, pr.ns) for a in cmd + args]
        if not argv:
            raise Refused(f"container {c.name!r}: no command or args (image entrypoints are unknown to the runner)")
        if argv[0] in VENV_ENTRYPOINTS or os.path.basename(argv[0]) in VENV_ENTRYPOINTS:
            exe = self.r.repo / ".venv" / "bin" / os.path.basename(argv[0])
            if exe.exists():
                argv[0] = str(exe)
        return argv

    # ------------------------------------------------------------------ sandbox
    def start(self, pr: PodRun, c: Container) -> None:
        spec, psc = c.spec, pr.pod["spec"].get("securityContext") or {}
        csc = spec.get("securityContext") or {}
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        gid = csc.get("runAsGroup", psc.get("runAsGroup"))
        non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root and not uid:
            raise Refused(f"container {c.name!r} has runAsNonRoot and would run as root (no runAsUser)")
        uid = int(uid or 0)
        gid = int(gid if gid is not None else (0 if uid == 0 else uid))
        env = self.env(pr, c)
        if uid != 0 and "HOME" not in {e["name"] for e in spec.get("env", [])}:
            env["HOME"] = "/"
        if not any(e["name"] == "PATH" for e in spec.get("env", [])):
            env["PATH"] = f"{self.r.repo / '.venv' / 'bin'}:{DEFAULT_PATH}"
        argv = self.command(pr, c, env)
        ro_root = bool(csc.get("readOnlyRootFilesystem"))

        # Mounts: (destination in the container, host source, read-only, is-file)
        mounts: list[tuple[str, str, bool]] = []
        for m in spec.get("volumeMounts", []):
            src = pr.volumes.get(m["name"])
            if src is None:
                raise Refused(f"container {c.name!r}: volumeMount {m['name']!r} has no volume")
            if m.get("subPath") or m.get("subPathExpr"):
                sub = m.get("subPath") or expand(m["subPathExpr"], env)
                if ".." in Path(sub).parts or sub.startswith("/"):
                    raise Refused(f"bad subPath {sub!r}")
                src = src / sub
                if not src.exists():
                    src.mkdir(parents=True)
                    src.chmod(0o777)
            mp = self._host_real(m["mountPath"])
            if str(self.r.repo) == mp or mp.startswith(str(self.r.repo).rstrip("/") + "/"):
                raise Refused(
                    f"container {c.name!r}: mountPath {m['mountPath']} is {self.r.repo} or inside it, where "
                    "the runner runs python from; mount it elsewhere"
                )
            mounts.append((m["mountPath"], str(src), bool(m.get("readOnly"))))
        groups = [int(g) for g in [psc.get("fsGroup"), *psc.get("supplementalGroups", [])] if g is not None]
        mounts += self._identity(pr, c, uid, gid, groups)
        term_dir = pr.dir / "termination"
        term_dir.mkdir(parents=True, exist_ok=True)
        term_file = term_dir / c.name
        term_file.write_bytes(b"")
        term_file.chmod(0o666)
        tpath = spec.get("terminationMessagePath", "/dev/termination-log")
        # The token: the ServiceAccount admission plugin adds the projected kube-api-access-* volume (token,
        # ca.crt, namespace) at /var/run/secrets/kubernetes.io/serviceaccount unless automount is off.
        tmp = pr.dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        tmp.chmod(0o1777)

        argv_b = self._sandbox(mounts, (tpath, str(term_file)), ro_root, uid, str(tmp), self._hostname(pr))
        argv_b += ["--ro-bind", str(self._hosts_file(pr)), "/etc/hosts"]
        workdir = spec.get("workingDir") or "/"
        argv_b += ["--chdir", workdir]
        if uid != 0 or gid != 0:
            argv_b += [self.setpriv, f"--reuid={uid}", f"--regid={gid}"]
            argv_b += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
            argv_b += ["--inh-caps=-all", "--bounding-set=-all", "--"]
        elif "ALL" in ((csc.get("capabilities") or {}).get("drop") or []):
            argv_b += [self.setpriv, "--inh-caps=-all", "--bounding-set=-all", "--"]
        argv_b += argv

        log_path = self.r.log_path(pr, c)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        c.log_offset = logf.tell()
        (pr.dir / f"{c.name}.cmdline").write_text(json.dumps({"argv": argv, "sandbox": argv_b, "env": env}, indent=1))
        r, w = os.pipe()
        argv_b[argv_b.index("INFO_FD")] = str(w)
        try:
            proc = subprocess.Popen(
                argv_b, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, pass_fds=(w,), close_fds=True,
            )  # fmt: skip
        finally:
            os.close(w)
            logf.close()
        info = b""
        with os.fdopen(r, "rb") as f:
            info = f.read()  # bwrap writes {"child-pid": N} after the clone, then closes it
        try:
            c.init_pid = int(json.loads(info)["child-pid"])
        except (ValueError, KeyError):
            c.init_pid = proc.pid  # the sandbox failed before its clone; the exit code tells
        c.proc = proc
        c.started_at = time.time()
        c.exit_code = None
        c.next_start = 0.0
        c.term_sent = False
        c.state = {"running": {"startedAt": now_iso(c.started_at)}}
        self.r.save_procs()
        log(f"{pr.ns}/{pr.name}/{c.name}: started pid {proc.pid} (uid {uid}): {' '.join(argv)[:200]}")

    @staticmethod
    def _norm(path: str) -> str:
        return os.path.normpath("/" + path)

    def _host_real(self, path: str) -> str:
        """`path` with the symlinks of its existing part resolved as on the host (/var/run -> /run)."""
        return os.path.realpath(self._norm(path))

    @staticmethod
    def _identity(pr: PodRun, c: Container, uid: int, gid: int, groups: list[int]) -> list[tuple[str, str, bool]]:
        """/etc/passwd and /etc/group with entries for the pod's uid/gids when the host lacks them.

        Images define their users (getpass.getuser(), which kopf calls, needs one); the host does not know
        e.g. 65532. The entries are named u<uid>/g<gid> with home /tmp.
        """
        out = []
        for name, ids, line in (
            ("passwd", [uid], lambda i: f"u{i}:x:{i}:{gid}::/tmp:/usr/sbin/nologin"),
            ("group", [gid, *groups], lambda i: f"g{i}:x:{i}:"),
        ):
            host = Path("/etc") / name
            try:
                text = host.read_text()
            except OSError:
                continue
            known = {int(f[2]) for f in (ln.split(":") for ln in text.splitlines()) if len(f) > 2 and f[2].isdigit()}
            extra = [line(i) for i in dict.fromkeys(ids) if i not in known]
            if extra:
                f = pr.dir / "etc" / c.name / name
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(text.rstrip("\n") + "\n" + "\n".join(extra) + "\n")
                f.chmod(0o644)
                out.append((str(host), str(f), True))
        return out

    def _hosts_file(self, pr: PodRun) -> Path:
        """/etc/hosts for the sandbox: the host's, plus the pod's own hostname and — for a pod with a
        `subdomain` (an Indexed Job's workers behind a headless Service) — the DNS names of its siblings
        <job>-<i>.<subdomain>[.<ns>[.svc[.cluster.local]]] for every index a Job can have (64), all
        127.0.0.1: pods share the host's network, and there is no cluster DNS."""
        spec, ns = pr.pod["spec"], pr.pod["metadata"]["namespace"]
        hostname = self._hostname(pr)
        lines = [Path("/etc/hosts").read_text().rstrip("\n"), f"127.0.0.1 {hostname}"]
        subdomain = spec.get("subdomain")
        base, sep, index = hostname.rpartition("-")
        if subdomain and sep and index.isdigit():
            for i in range(64):
                name = f"{base}-{i}.{subdomain}"
                lines.append(f"127.0.0.1 {name} {name}.{ns} {name}.{ns}.svc {name}.{ns}.svc.cluster.local")
        path = pr.dir / "hosts"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o644)
        return path

    @staticmethod
    def _hostname(pr: PodRun) -> str:
        return (pr.pod["spec"].get("hostname") or pr.name)[:63].rstrip("-.") or "pod"

    def _sandbox(self, mounts, term, ro_root: bool, uid: int, tmp: str, hostname: str) -> list[str]:
        """bwrap arguments: a root of bind mounts, /proc, /dev, /tmp, the volumes, the termination file."""
        targets = [(self._host_real(d), s, ro, False) for d, s, ro in mounts]
        targets.append((self._host_real(term[0]), term[1], False, True))
        vol_dests = [t[0] for t in targets[:-1]]
        # Directories that must be tmpfs "mirrors" (their host children bound one by one): the deepest
        # existing ancestor of every mountpoint that does not exist on the host, and all its ancestors.
        mirror = {"/"}
        for dest, *_ in targets:
            if any(dest != v and dest.startswith(v.rstrip("/") + "/") for v in vol_dests):
                continue  # inside another volume: created in that volume's directory
            if dest.startswith(("/dev/", "/proc/", "/tmp/")) or dest in ("/dev", "/proc", "/tmp"):
                continue  # fresh filesystems in the sandbox
            if os.path.lexists(dest):
                continue
            p = os.path.dirname(dest)
            while not os.path.isdir(p):
                p = os.path.dirname(p)
            while p != "/":
                mirror.add(p)
                p = os.path.dirname(p)
        if uid != 0:  # a non-root user must traverse to the venv's interpreter (/root is 0700)
            for path in (os.path.realpath(self.r.repo / ".venv" / "bin" / "python"), str(self.r.repo)):
                p = os.path.dirname(path)
                while p != "/":
                    if not os.stat(p).st_mode & 0o001:
                        q_ = p
                        while q_ != "/":
                            mirror.add(q_)
                            q_ = os.path.dirname(q_)
                    p = os.path.dirname(p)
        bind = "--ro-bind" if ro_root else "--bind"
        a = [self.bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--new-session",
             "--info-fd", "INFO_FD", "--hostname", hostname]  # fmt: skip
        for d in sorted(mirror, key=lambda p: (p.count("/") if p != "/" else 0, p)):
            if d != "/":
                a += ["--perms", "0755", "--dir", d]
            with os.scandir(d) as it:
                for e in it:
                    if e.path in mirror or (d == "/" and e.name in ("proc", "dev", "tmp", "sys")):
                        continue
                    if e.is_symlink():
                        a += ["--symlink", os.readlink(e.path), e.path]
                    else:
                        a += [bind, e.path, e.path]
        a += ["--ro-bind", "/sys", "/sys", "--proc", "/proc", "--dev", "/dev"]
        a += ["--ro-bind" if ro_root else "--bind", tmp, "/tmp"]
        made: set[str] = set()
        for dest, src, ro, _ in [*sorted(targets[:-1], key=lambda t: t[0].count("/")), targets[-1]]:
            self._parents(a, dest, targets, made)
            a += ["--ro-bind" if ro else "--bind", src, dest]
        self._keep_repo_visible(a, targets[:-1], tmp)
        if ro_root:
            a += ["--remount-ro", "/"]
        return a

    def _keep_repo_visible(self, a: list[str], volumes, tmp: str) -> None:
        """A checkout under /tmp or under a volume's mountPath (CI clones to /tmp; pods mount /tmp) would be
        hidden by the fresh filesystem: bind it back read-only on top. Its mountpoint is made in the host
        directory backing that filesystem, because the mount itself may be read-only."""
        repo = str(self.r.repo)
        holders = [(dest, src) for dest, src, _ro, _ in volumes if repo.startswith(dest.rstrip("/") + "/")]
        if repo.startswith("/tmp/"):
            holders.append(("/tmp", tmp))
        if not holders:
            return
        dest, src = max(holders, key=lambda h: len(h[0]))
        os.makedirs(os.path.join(src, os.path.relpath(repo, dest)), exist_ok=True)
        a += ["--ro-bind", repo, repo]

    @staticmethod
    def _parents(a: list[str], dest: str, targets, made: set[str]) -> None:
        """Create the missing parents of mountpoint `dest` with mode 0755 (bwrap would make them 0700).

        Inside another volume they are made in its host directory; elsewhere in the sandbox's tmpfs
        (the mirror logic guarantees that a missing directory's parent is a tmpfs or a fresh /dev, /tmp).
        """
        inside = [(d, s) for d, s, _, f in targets if not f and dest != d and dest.startswith(d.rstrip("/") + "/")]
        parent = os.path.dirname(dest)
        if inside:
            vdest, vsrc = max(inside, key=lambda t: len(t[0]))
            host = Path(vsrc) / os.path.relpath(parent, vdest)
            if not host.exists():
                host.mkdir(parents=True, mode=0o755)
            return
        missing = []
        while (
            parent != "/"
            and parent not in made
            and not (os.path.lexists(parent) and not parent.startswith(("/dev/", "/tmp/")))
        ):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for d in reversed(missing):
            if d not in ("/dev/shm", "/dev/pts", "/dev/mqueue"):
                a += ["--perms", "0755", "--dir", d]
            made.add(d)

    def termination_message(self, pr: PodRun, c: Container, code: int, start_error: str | None) -> str:
        if start_error:
            return start_error[:4096]
        try:
            msg = (pr.dir / "termination" / c.name).read_bytes()[:4096].decode(errors="replace")
        except OSError:
            msg = ""
        if not msg.strip() and code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            msg = read_tail(self.r.log_path(pr, c), 2048, 80, start=c.log_offset)
        return msg


# ---------------------------------------------------------------------------------------------- services
class Services:
    """`host:port` naming a Service -> `127.0.0.1:<targetPort>` of the process behind it."""

    HOSTPORT = re.compile(r"(?<![A-Za-z0-9.\-])([a-z0-9](?:[a-z0-9.-]*[a-z0-9])?):([0-9]{1,5})(?![0-9])")

    def __init__(self, runner: Runner):
        self.r = runner

    def rewrite(self, value: str, ns: str) -> str:
        if ":" not in value:
            return value
        return self.HOSTPORT.sub(lambda m: self._sub(m, ns), value)

    def _sub(self, m: re.Match, ns: str) -> str:
        target = self.resolve(m.group(1), int(m.group(2)), ns)
        return f"127.0.0.1:{target}" if target else m.group(0)

    def resolve(self, host: str, port: int, ns: str) -> int | None:
        h = host
        for suffix in (".svc.cluster.local", ".svc"):
            if h.endswith(suffix):
                h = h[: -len(suffix)]
                break
        parts = h.split(".")
        if len(parts) > 2 or any(not p or p.isdigit() for p in parts):
            return None
        svc, sns = (parts[0], ns) if len(parts) == 1 else parts
        if (svc, sns) == ("kubernetes", "default"):
            return self.r.api_port if port == 443 else None
        try:
            obj = self.r.admin.get(f"/api/v1/namespaces/{sns}/services/{svc}", missing_ok=True)
        except (ApiError, OSError):
            return None
        if not obj:
            return None
        sp = next((p for p in obj["spec"].get("ports", []) if p.get("port") == port), None)
        if sp is None:
            return None
        tp = sp.get("targetPort", port)
        if isinstance(tp, int) or str(tp).isdigit():
            return int(tp)
        selector = obj["spec"].get("selector") or {}
        if not selector:
            return None
        sel = ",".join(f"{k}={v}" for k, v in selector.items())
        try:
            # As admin: the Node authorizer lets a node list only the pods bound to it.
            pods = self.r.admin.get(f"/api/v1/namespaces/{sns}/pods" + q(labelSelector=sel))["items"]
        except (ApiError, OSError):
            return None
        pods.sort(key=lambda p: (p.get("status", {}).get("phase") != "Running", p["metadata"]["creationTimestamp"]))
        for p in pods:
            if p.get("status", {}).get("phase") in TERMINATED:
                continue
            for cont in p["spec"]["containers"]:
                for cp in cont.get("ports", []):
                    if cp.get("name") == tp:
                        return int(cp["containerPort"])
        return None


# ---------------------------------------------------------------------------------------------- provisioner
class Provisioner:
    """PVs for PVCs of the `standard` StorageClass (directories under the runner's work dir)."""

    def __init__(self, runner: Runner, admin: Api):
        self.r, self.api = runner, admin
        self.next = 0.0

    def ensure_class(self) -> None:
        default = {"storageclass.kubernetes.io/is-default-class": "true"}
        sc = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
              "metadata": {"name": STORAGE_CLASS, "annotations": default},
              "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"}  # fmt: skip
        try:
            self.api.request("POST", "/apis/storage.k8s.io/v1/storageclasses", sc)
        except ApiError as e:
            if e.status != 409:
                raise

    def tick(self, now: float) -> None:
        if now < self.next:
            return
        self.next = now + 1.0
        try:
            classes = {c["metadata"]["name"] for c in self.api.get("/apis/storage.k8s.io/v1/storageclasses")["items"]
                       if c.get("provisioner") == PROVISIONER}  # fmt: skip
            for pvc in self.api.get("/api/v1/persistentvolumeclaims")["items"]:
                spec, md = pvc["spec"], pvc["metadata"]
                if spec.get("volumeName") or spec.get("storageClassName") not in classes or md.get("deletionTimestamp"):
                    continue
                self._provision(pvc)
            for pv in self.api.get("/api/v1/persistentvolumes")["items"]:
                ann = pv["metadata"].get("annotations") or {}
                if (
                    ann.get("pv.kubernetes.io/provisioned-by") == PROVISIONER
                    and pv.get("status", {}).get("phase") == "Released"
                ):
                    ref = pv["spec"].get("claimRef") or {}
                    self.api.request(
                        "DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}", ok=(200, 202, 404)
                    )
                    shutil.rmtree(
                        self.r.volumes.pvc_dir(ref.get("namespace", "_"), ref.get("name", "_")), ignore_errors=True
                    )
        except (ApiError, OSError) as e:
            log(f"provisioner: {e}")

    def _provision(self, pvc: dict) -> None:
        md, spec = pvc["metadata"], pvc["spec"]
        path = self.r.volumes.pvc_dir(md["namespace"], md["name"])
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        size = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        pv = {"apiVersion": "v1", "kind": "PersistentVolume",
              "metadata": {"name": f"pvc-{md['uid']}", "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
              "spec": {"capacity": {"storage": size}, "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                       "persistentVolumeReclaimPolicy": "Delete", "storageClassName": spec["storageClassName"],
                       "volumeMode": spec.get("volumeMode", "Filesystem"), "hostPath": {"path": str(path)},
                       "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": md["namespace"],
                                    "name": md["name"], "uid": md["uid"]}}}  # fmt: skip
        try:
            self.api.request("POST", "/api/v1/persistentvolumes", pv)
            log(f"provisioner: PV {pv['metadata']['name']} for {md['namespace']}/{md['name']}")
        except ApiError as e:
            if e.status != 409:
                raise


# ---------------------------------------------------------------------------------------------- runner
class Runner:
    def __init__(self, args):
        self.node = args.node
        self.workdir = Path(args.workdir)
        self.logs = Path(args.logs)
        self.repo = Path(args.repo)
        self.keep_pods = args.keep_pods
        self.ca_file = Path(args.ca)
        self.server = args.server
        self.api_port = urllib.parse.urlsplit(args.server).port
        self._api_args = (args.server, args.ca, args.cert, args.key)
        self.api = Api(*self._api_args)
        self.admin = Api(args.server, args.ca, args.admin_cert, args.admin_key)
        self.volumes = Volumes(self)
        self.launcher = Launcher(self)
        self.services = Services(self)
        self.provisioner = Provisioner(self, self.admin)
        self.events: queue.Queue = queue.Queue()
        self.pods: dict[str, PodRun] = {}  # by uid
        self.finished: dict[str, float] = {}  # uids removed by us: later events (finalizers) are ignored
        self.stopping = threading.Event()
        self.procs_file = self.workdir / "procs.json"

    def log_path(self, pr: PodRun, c: Container) -> Path:
        return self.logs / f"{pr.ns}_{pr.name}_{c.name}.log"

    def save_procs(self) -> None:
        procs = {f"{pr.ns}/{pr.name}/{c.name}": [c.proc.pid, c.init_pid]
                 for pr in self.pods.values() for c in pr.containers if c.proc is not None}  # fmt: skip
        tmp = self.procs_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bwrap": self.launcher.bwrap, "procs": procs}))
        tmp.replace(self.procs_file)

    # ------------------------------------------------------------------ watch (thread)
    def _watch(self) -> None:
        api = Api(*self._api_args)
        path = "/api/v1/pods"
        sel = f"spec.nodeName={self.node}"
        rv = None
        while not self.stopping.is_set():
            try:
                if rv is None:
                    lst = api.get(path + q(fieldSelector=sel))
                    rv = lst["metadata"]["resourceVersion"]
                    self.events.put(("SYNC", lst["items"]))
                conn = api.connect(None)
                conn.request("GET", path + q(fieldSelector=sel, watch="1", resourceVersion=rv,
                                              allowWatchBookmarks="true", timeoutSeconds="240"),
                             headers={"Accept": "application/json"})  # fmt: skip
                resp = conn.getresponse()
                if resp.status != 200:
                    log(f"watch: HTTP {resp.status}: {resp.read()[:200]!r}")
                    rv = None
                    time.sleep(0.5)
                    continue
                while not self.stopping.is_set():
                    line = resp.readline()
                    if not line:
                        break
                    ev = json.loads(line)
                    obj = ev.get("object") or {}
                    if ev["type"] == "ERROR":
                        if obj.get("code") == 410:
                            rv = None
                        break
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev["type"] != "BOOKMARK":
                        self.events.put((ev["type"], obj))
                conn.close()
            except Exception as e:  # keep watching whatever happens
                if self.stopping.is_set():
                    break
                log(f"watch: {type(e).__name__}: {e}")
                rv = None
                time.sleep(0.5)

    # ------------------------------------------------------------------ main loop
    def handle(self, kind: str, obj) -> None:
        if kind == "SYNC":
            seen = {p["metadata"]["uid"] for p in obj}
            for uid, pr in list(self.pods.items()):
                if uid not in seen:
                    pr.gone()
                    del self.pods[uid]
            for p in obj:
                self.handle("MODIFIED", p)
            return
        uid = obj["metadata"]["uid"]
        if uid in self.finished:
            return
        pr = self.pods.get(uid)
        if kind == "DELETED":
            if pr is not None:
                pr.gone()
                del self.pods[uid]
                self.save_procs()
            return
        if pr is None:
            phase = (obj.get("status") or {}).get("phase")
            if phase in TERMINATED:
                if obj["metadata"].get("deletionTimestamp"):  # finish the deletion of a finished pod
                    pr = PodRun(self, obj)
                    pr.phase = phase
                    pr.adopted = True
                    pr.update(obj)
                    self.pods[uid] = pr
                return
            pr = PodRun(self, obj)
            self.pods[uid] = pr
            log(f"{pr.ns}/{pr.name}: new pod")
        pr.update(obj)

    def run(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.save_procs()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stopping.set())
        for attempt in range(50):
            try:
                self.provisioner.ensure_class()
                break
            except (ApiError, OSError) as e:
                if attempt == 49:
                    raise
                log(f"waiting for the API server: {e}")
                time.sleep(0.2)
        threading.Thread(target=self._watch, name="watch", daemon=True).start()
        ready = self.workdir / "ready"
        while not self.stopping.is_set():
            try:
                kind, obj = self.events.get(timeout=0.05)
                self.handle(kind, obj)
                while True:
                    kind, obj = self.events.get_nowait()
                    self.handle(kind, obj)
            except queue.Empty:
                pass
            except Exception:
                log("event: " + traceback.format_exc())
            now = time.time()
            for uid, pr in list(self.pods.items()):
                try:
                    pr.step(now)
                except Exception:  # one pod's bug must not stop the others
                    log(f"{pr.ns}/{pr.name}: " + traceback.format_exc())
                if pr.removed and not any(c.running for c in pr.containers):
                    self.pods.pop(uid, None)
                    self.finished[uid] = now
                    self.save_procs()
            self.provisioner.tick(now)
            if not ready.exists():
                ready.write_text(str(os.getpid()))
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stop every process (SIGTERM, 3 s, SIGKILL); the pods' status is left as it is."""
        running = [(pr, c) for pr in self.pods.values() for c in pr.containers if c.running]
        log(f"stopping {len(running)} container process(es)")
        for _, c in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.init_pid, signal.SIGTERM)
        deadline = time.time() + 3
        for _, c in running:
            try:
                c.proc.wait(max(0.01, deadline - time.time()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(c.init_pid, signal.SIGKILL)
                c.proc.kill()
                c.proc.wait(5)
            c.proc = None
        self.save_procs()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node", required=True)
    ap.add_argument("--server", required=True, help="https://127.0.0.1:PORT")
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True, help="the node's client certificate (system:node:<node>)")
    ap.add_argument("--key", required=True)
    ap.add_argument("--admin-cert", required=True, help="for the PV provisioner")
    ap.add_argument("--admin-key", required=True)
    ap.add_argument("--workdir", required=True, help="pod volumes, PVC directories, procs.json")
    ap.add_argument("--logs", required=True, help="per-container log files")
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[2]))
    ap.add_argument("--keep-pods", action="store_true", help="keep pod directories after the pod ends")
    args = ap.parse_args(argv)
    if not shutil.which("bwrap"):
        log("bwrap not found: run hack/testenv/deps.sh (Debian package bubblewrap)")
        return 3
    return Runner(args).run()


if __name__ == "__main__":
    sys.exit(main())
