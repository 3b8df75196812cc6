#!/usr/bin/env python3
"""A real Kubernetes control plane on loopback, for the e2e tests (Python standard library only).

    hack/testenv/cluster.py up                 # start, print KUBECONFIG, stop on Ctrl-C
    hack/testenv/cluster.py start [--workdir D] # start detached, print `export KUBECONFIG=...`
    hack/testenv/cluster.py status|stop [--workdir D]
    hack/testenv/cluster.py build              # only build/cache the binaries (hack/testenv/build.sh)

What runs (binaries from build.sh, versions in versions.env), each a child process stopped by PID:

    etcd                     TLS with client certificates, on a random loopback port
    kube-apiserver           Node,RBAC authorization, service-account token issuer + signing key, the default
                             admission plugins (NamespaceLifecycle, ServiceAccount, PodSecurity, ...) plus
                             NodeRestriction, a random loopback port
    kube-controller-manager  job, garbagecollector, namespace, serviceaccount(-token), ttl-after-finished,
                             nodelifecycle, podgc, deployment, replicaset, ... with per-controller
                             service-account credentials (as kubeadm runs it)
    kube-scheduler
    kwok                     only with nodes=N / --nodes N (bench/operator_scale.py): fake nodes "kwok-node-N"
                             kept Ready; their pods go Running, Job pods Succeeded, without executing anything
    the node                 with --kubelet-node / LocalCluster(kubelet_node=True), as tests/e2e runs it: the
                             cluster's only node, "finetune-kubelet" (kubelet_node.py): Debian's containerd +
                             the upstream kubelet running pods from locally built images, CNI bridge
                             networking, kube-proxy (Service IPs), CoreDNS (Service and pod host names) and a
                             hostPath provisioner (provisioner.py) for PVCs. Without it there is no node: the
                             integration tier plays the kubelet itself (tests/integration/apiserver_util.py).

Everything lives in one work directory: pki/, etcd data, logs/<component>.log, kubeconfig (admin,
client-certificate auth, system:masters), state.json (PIDs). Use from Python:

    with LocalCluster() as c:       # or c = LocalCluster(); c.start(); ...; c.stop()
        os.environ["KUBECONFIG"] = str(c.kubeconfig)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD_SH = HERE / "build.sh"
VERSIONS_ENV = HERE / "versions.env"
DEPS_SH = HERE / "deps.sh"
KUBELET_NODE_PY = HERE / "kubelet_node.py"
PROVISIONER_PY = HERE / "provisioner.py"

SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.1/16"  # kwok's fake pods
SERVICE_IP = "10.96.0.1"
CLUSTER_DOMAIN = "cluster.local"

# A normal cluster's controller set, minus cloud/IPAM/CSR bits that need infrastructure we don't have.
CONTROLLERS = [
    "job-controller",
    "cronjob-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "ttl-after-finished-controller",
    "ttl-controller",
    "node-lifecycle-controller",
    "taint-eviction-controller",
    "pod-garbage-collector-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "daemonset-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "resourcequota-controller",
    "disruption-controller",
    "clusterrole-aggregation-controller",
    "persistentvolume-protection-controller",
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-binder-controller",
    "validatingadmissionpolicy-status-controller",
    "service-cidr-controller",
]

# Admission plugins on top of the defaults (which already include NamespaceLifecycle, LimitRanger,
# ServiceAccount, PodSecurity, Priority, DefaultTolerationSeconds, TaintNodesByCondition, ResourceQuota,
# MutatingAdmissionWebhook, ValidatingAdmissionWebhook, ValidatingAdmissionPolicy, ...).
ADMISSION_PLUGINS = [
    "NamespaceLifecycle",
    "LimitRanger",
    "ServiceAccount",
    "PodSecurity",
    "NodeRestriction",
    "Priority",
    "DefaultTolerationSeconds",
    "DefaultStorageClass",
    "ResourceQuota",
    "MutatingAdmissionWebhook",
    "ValidatingAdmissionWebhook",
    "ValidatingAdmissionPolicy",
]


class ClusterError(RuntimeError):
    """The local cluster could not be built or started (the message names the log to read)."""


def log(msg: str) -> None:
    print(f"[testenv] {msg}", file=sys.stderr, flush=True)


def read_versions() -> dict[str, str]:
    out = {}
    for line in VERSIONS_ENV.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def build_binaries(with_kubelet: bool = False, quiet: bool = False, stream: bool = True) -> dict[str, Path]:
    """Run build.sh (a no-op in well under a second when cached) and return {name: path}.

    quiet: build.sh prints only what it builds. stream=False: its stderr is kept for the error message
    instead of going to our stderr.
    """
    cmd = ["bash", str(BUILD_SH)]
    if with_kubelet:
        cmd.append("--with-kubelet")
    if quiet:
        cmd.append("--quiet")
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=None if stream else subprocess.PIPE, text=True, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:]) or "its output is above"
        raise ClusterError(f"{BUILD_SH.name} failed (exit code {proc.returncode}): {tail}")
    paths = {}
    for line in proc.stdout.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            paths[k] = Path(v)
    missing = [k for k, p in paths.items() if not p.exists()]
    if missing:
        raise ClusterError(f"build.sh reported missing binaries: {missing}")
    return paths


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


try:
    _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, not between fork and exec
except OSError:  # pragma: no cover - not glibc/Linux
    _LIBC = None


def _set_pdeathsig() -> None:
    """In the child before exec: kill it when the parent (the test process) dies, even by SIGKILL."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; SIGTERM can leave the apiserver hanging


# ---------------------------------------------------------------------------------------------- PKI
class PKI:
    """A CA and leaf certificates made with the openssl CLI (ECDSA P-256: fast to generate)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.openssl = shutil.which("openssl")
        if not self.openssl:
            raise ClusterError("openssl not found (Debian package: openssl)")
        self.ca_crt, self.ca_key = root / "ca.crt", root / "ca.key"

    def _run(self, *args: str) -> None:
        proc = subprocess.run([self.openssl, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ClusterError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")

    def make_ca(self, name: str = "ca", cn: str = "finetune-e2e-ca"):
        crt, key = self.root / f"{name}.crt", self.root / f"{name}.key"
        self._run(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(crt), "-days", "3650", "-subj", f"/CN={cn}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        )  # fmt: skip
        return crt, key

    def make_cert(self, name: str, cn: str, org: str = "", server_names: list[str] | None = None, ca: str = "ca"):
        crt, key = self.root / f"{name}.crt", self.root / f"{name}.key"
        ca_crt, ca_key = self.root / f"{ca}.crt", self.root / f"{ca}.key"
        subj = f"/CN={cn}" + (f"/O={org}" if org else "")
        args = [
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(crt), "-days", "365", "-subj", subj,
            "-CA", str(ca_crt), "-CAkey", str(ca_key),
            "-addext", "basicConstraints=critical,CA:FALSE",
            "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
            "-addext", "extendedKeyUsage=serverAuth,clientAuth",
        ]  # fmt: skip
        if server_names:
            sans = ",".join((f"IP:{n}" if n.replace(".", "").isdigit() else f"DNS:{n}") for n in server_names)
            args += ["-addext", f"subjectAltName={sans}"]
        self._run(*args)
        return crt, key

    def make_keypair(self, name: str):
        key, pub = self.root / f"{name}.key", self.root / f"{name}.pub"
        self._run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", str(key))
        self._run("pkey", "-in", str(key), "-pubout", "-out", str(pub))
        return key, pub


def kubelet_image_dir() -> Path:
    """The node's image cache: its containerd store (kept between sessions) and any `docker save` archives."""
    cache = os.environ.get("FINETUNE_TESTENV_CACHE") or Path.home() / ".cache" / "finetune-operator" / "testenv"
    return Path(cache) / "images"


def default_kubelet_images() -> list[str]:
    """$FINETUNE_KUBELET_IMAGES (os.pathsep-separated image names or archive paths), else the archives there."""
    env = os.environ.get("FINETUNE_KUBELET_IMAGES")
    if env is not None:
        return [p for p in env.split(os.pathsep) if p]
    d = kubelet_image_dir()
    return [str(p) for p in sorted(d.glob("*.tar"))] if d.is_dir() else []


def _load_kubelet_node():
    """hack/testenv/kubelet_node.py (imported on demand: only kubelet-node clusters need it)."""
    import importlib.util

    name = "finetune_testenv_kubelet_node"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, KUBELET_NODE_PY)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _tcp_ok(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def _rfc3339(stamp: str) -> float:
    """time.time() of a Kubernetes timestamp (2026-01-02T03:04:05Z)."""
    import calendar

    return float(calendar.timegm(time.strptime(stamp.rstrip("Z").split(".")[0], "%Y-%m-%dT%H:%M:%S")))


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, crt: Path, key: Path, user: str) -> Path:
    """Kubeconfig as JSON (valid YAML), credentials embedded so the file stands alone."""
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "finetune-e2e", "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}],
        "users": [{"name": user, "user": {"client-certificate-data": _b64(crt), "client-key-data": _b64(key)}}],
        "contexts": [{"name": "finetune-e2e", "context": {"cluster": "finetune-e2e", "user": user}}],
        "current-context": "finetune-e2e",
        "preferences": {},
    }
    path.write_text(json.dumps(cfg, indent=2))
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------------------------------------- cluster
class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler (+ the real node) in `workdir`."""

    def __init__(
        self,
        workdir: Path | str | None = None,
        nodes: int = 0,
        detach: bool = False,
        binaries: dict[str, Path] | None = None,
        kubelet_node: bool = False,
        kubelet_images: list[Path | str] | None = None,
    ):
        """nodes: kwok fake nodes (for scale benchmarks: pods are scheduled, nothing runs).

        kubelet_node: also start containerd + the real kubelet as node `finetune-kubelet` (kubelet_node.py),
        the cluster's only node, with kube-proxy, CoreDNS and the hostPath provisioner (provisioner.py) next to
        it; kubelet_images: images imported into its containerd before it starts: names of Docker images
        (`docker save | ctr import`) or archives (`docker save` / OCI); None: default_kubelet_images().
        """
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="finetune-testenv-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.state_file = self.workdir / "state.json"
        self.nodes = [f"kwok-node-{i}" for i in range(nodes)]
        self.detach = detach  # True: children survive this Python process (CLI `start`)
        self.binaries = binaries
        self.procs: dict[str, subprocess.Popen] = {}
        self.pids: dict[str, int] = {}
        self.argv: dict[str, list[str]] = {}  # each component's command line, to start it again after a fault
        self.ports: dict[str, int] = {}
        self.server = ""
        self._ctx: ssl.SSLContext | None = None
        self.timings: dict[str, float] = {}
        self.kubelet_node = kubelet_node
        self.kubelet_images = default_kubelet_images() if kubelet_images is None else [str(p) for p in kubelet_images]
        self.node_dir = self.workdir / "kubelet-node"
        self._node = None  # kubelet_node.KubeletNode while it runs

    # ------------------------------------------------------------------ public
    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> LocalCluster:
        t0 = time.monotonic()
        try:
            self._start(t0 + timeout)
        except BaseException as e:
            self.stop()
            if isinstance(e, ClusterError):
                raise
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise ClusterError(f"{type(e).__name__}: {e} (component logs: {self.logs})") from e
        self.timings["total"] = time.monotonic() - t0
        log(f"cluster ready in {self.timings['total']:.1f} s: KUBECONFIG={self.kubeconfig} (logs: {self.logs})")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every component by PID, in reverse start order: SIGTERM, wait, then SIGKILL."""
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        pids = dict(self.pids) or {k: int(v) for k, v in state.get("pids", {}).items()}
        exe = state.get("exe", {})
        if state.get("kubelet_node"):  # pods, kubelet, containerd, shims, cgroups, bridge: its own order
            node = self._node or _load_kubelet_node().KubeletNode(self.node_dir, state["kubelet_node"])
            self.timings.update(
                node.stop(
                    pids.pop("kubelet", None),
                    pids.pop("containerd", None),
                    lambda pid, exe_path: self._is_ours(pid, exe_path),
                    log,
                )
            )
            self.pids.pop("kubelet", None)
            self.pids.pop("containerd", None)
            self.procs.pop("kubelet", None)
            self.procs.pop("containerd", None)
            self._node = None
        if getattr(self, "_store_lock", None) is not None:  # the node is down: its image store is free
            os.close(self._store_lock)
            self._store_lock = None
        for name, pid in reversed(list(pids.items())):
            if not self._is_ours(pid, exe.get(name)):
                continue
            t0 = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if self._alive(pid, name, wait=timeout) and self._is_ours(pid, exe.get(name)):
                log(f"{name} (pid {pid}) still running {timeout:.0f} s after SIGTERM; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._alive(pid, name, wait=5.0)
            self.timings[f"stop {name}"] = time.monotonic() - t0
        self.procs.clear()
        self.pids.clear()
        if state.get("kubelet_node") and exe.get("kube-proxy"):  # its iptables chains outlive it
            _load_kubelet_node().KubeletNode(self.node_dir, state["kubelet_node"]).kube_proxy_cleanup(
                Path(exe["kube-proxy"]), log
            )
        if self.state_file.exists():
            state["pids"] = {}
            self.state_file.write_text(json.dumps(state, indent=2))

    def stop_component(self, name: str, timeout: float = 10.0) -> None:
        """Stop one component (SIGTERM, then SIGKILL): an outage for a fault test; start_component ends it."""
        proc = self.procs.pop(name)
        self.pids.pop(name, None)
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        self._save_state()

    def start_component(self, name: str, timeout: float = 60.0) -> None:
        """Start a component stopped by stop_component again: same command line, ports, certificates, data."""
        self._spawn(name, [], argv=self.argv[name])
        if name == "kube-apiserver":
            self._wait(name, lambda: self._https_ok(self.ports["apiserver"], "/readyz"), time.monotonic() + timeout)

    def stray_pids(self) -> dict[str, int]:
        """PIDs of components that are still alive (should be empty after stop())."""
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        known = state.get("all_pids", {})
        stray = {n: p for n, p in known.items() if self._is_ours(p, state.get("exe", {}).get(n))}
        if state.get("kubelet_node"):  # containers and runc shims of the kubelet node
            stray.update(_load_kubelet_node().KubeletNode(self.node_dir, state["kubelet_node"]).stray())
        return stray

    def pod_log_tails(self, since: float = 0.0, max_bytes: int = 3000) -> list[tuple[str, str]]:
        """(name, tail) of every pod container started since `since` (time.time()), as `kubectl logs` reads
        them: pods/log through the API server from the kubelet."""
        out = []
        status, pods = self.api("GET", "/api/v1/pods")
        for pod in pods.get("items", []) if status == 200 else []:
            md = pod["metadata"]
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                state = cs.get("state") or {}
                started = (state.get("running") or state.get("terminated") or {}).get("startedAt")
                if not started or _rfc3339(started) < since - 1:
                    continue
                path = (f"/api/v1/namespaces/{md['namespace']}/pods/{md['name']}/log?container={cs['name']}"
                        f"&tailLines=60&limitBytes={max_bytes}")  # fmt: skip
                with contextlib.suppress(OSError):
                    code, text = self.api("GET", path)
                    name = f"{md['namespace']}/{md['name']}/{cs['name']}"
                    out.append((name, text if code == 200 else f"HTTP {code}"))
        return out

    def container_cgroup(self, controller: str, pod_uid: str, container_id: str) -> Path | None:
        """A container's cgroup directory on the kubelet node (None without it): resource tests read limits there."""
        if not self.kubelet_node:
            return None
        return self._running_node().container_cgroup(controller, pod_uid, container_id)

    @property
    def host_address(self) -> str:
        """Where pods reach a server on this host: the node at its bridge address (its InternalIP)."""
        if not self.kubelet_node:
            return "127.0.0.1"
        return self._running_node().state["gateway"]

    def _running_node(self):
        """The kubelet node this object started, or one rebuilt from state.json (a cluster started elsewhere)."""
        return self._node or _load_kubelet_node().KubeletNode(
            self.node_dir, json.loads(self.state_file.read_text())["kubelet_node"]
        )

    def pvc_dir(self, namespace: str, claim: str) -> Path | None:
        """The host directory behind a bound PVC (its PV's hostPath, made by provisioner.py)."""
        status, pvc = self.api("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
        volume = pvc.get("spec", {}).get("volumeName") if status == 200 else None
        if not volume:
            return None
        status, pv = self.api("GET", f"/api/v1/persistentvolumes/{volume}")
        path = (pv.get("spec", {}).get("hostPath") or {}).get("path") if status == 200 else None
        return Path(path) if path else None

    def rss_bytes(self) -> dict[str, int]:
        out = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[name] = int(line.split()[1]) * 1024
        return out

    def cleanup(self, keep_logs: bool = False) -> None:
        """Remove the work directory (only when no component is running); keep_logs: all but logs/ and
        state.json (the node's image store and the volumes are gigabytes)."""
        if self.stray_pids():
            return
        if not keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)
            return
        for entry in self.workdir.iterdir() if self.workdir.is_dir() else []:
            if entry.name in ("logs", "state.json"):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    # ------------------------------------------------------------------ API access (stdlib)
    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 10.0):
        """One request to the API server as admin; returns (status, parsed JSON or text)."""
        host, port = "127.0.0.1", self.ports["apiserver"]
        conn = http.client.HTTPSConnection(host, port, context=self._ssl(), timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read().decode(errors="replace")
            try:
                return resp.status, json.loads(raw)
            except ValueError:
                return resp.status, raw
        finally:
            conn.close()

    # ------------------------------------------------------------------ internals
    def _ssl(self) -> ssl.SSLContext:
        if self._ctx is None:
            ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
            ctx.load_cert_chain(str(self.pki.root / "admin.crt"), str(self.pki.root / "admin.key"))
            self._ctx = ctx
        return self._ctx

    @staticmethod
    def _is_ours(pid: int, exe: str | None) -> bool:
        """True if `pid` is alive and still runs the binary we started (PIDs get reused)."""
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            return False
        stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
        if ") Z " in stat:  # zombie: dead, only not yet reaped
            return False
        return exe is None or cmd == exe

    def _alive(self, pid: int, name: str, wait: float = 0.0) -> bool:
        proc = self.procs.get(name)
        if proc is not None:
            try:
                proc.wait(timeout=wait or 0.001)
                return False
            except subprocess.TimeoutExpired:
                return True
        deadline = time.monotonic() + wait
        while True:
            alive = self._is_ours(pid, None)
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.05)

    def _save_state(self) -> None:
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        state.update(
            {
                "workdir": str(self.workdir),
                "kubeconfig": str(self.kubeconfig),
                "server": self.server,
                "ports": self.ports,
                "pids": self.pids,
                "all_pids": {**state.get("all_pids", {}), **self.pids},
                "exe": {**state.get("exe", {}), **{n: str(self.binaries[n]) for n in self.pids}},
            }
        )
        self.state_file.write_text(json.dumps(state, indent=2))

    def _spawn(self, name: str, args: list[str], argv: list[str] | None = None) -> subprocess.Popen:
        """Start binaries[name] with `args`; or run `argv` (a wrapper that execs binaries[name])."""
        exe = self.binaries[name]
        cmd = argv or [str(exe), *args]
        self.argv[name] = cmd
        logf = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        (self.logs / f"{name}.cmdline").write_text(" \\\n  ".join(cmd) + "\n")
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, not the components
            preexec_fn=None if self.detach else _set_pdeathsig,
            close_fds=True,
        )
        logf.close()
        self.procs[name] = proc
        self.pids[name] = proc.pid
        self._save_state()
        return proc

    def _check_running(self) -> None:
        for name, proc in self.procs.items():
            rc = proc.poll()
            if rc is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-25:]
                raise ClusterError(
                    f"{name} exited with code {rc} during start-up; log {self.logs / (name + '.log')}:\n"
                    + "\n".join(tail)
                )

    def _wait(self, what: str, check, deadline: float, interval: float = 0.1) -> None:
        t0 = time.monotonic()
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            self._check_running()
            try:
                if check():
                    self.timings[what] = time.monotonic() - t0
                    return
            except Exception as e:
                last_err = e
            time.sleep(interval)
        raise ClusterError(f"timed out waiting for {what} (last error: {last_err}); logs: {self.logs}")

    def _https_ok(self, port: int, path: str, client_cert: bool = True, verify: bool = True) -> bool:
        # kcm and the scheduler serve self-signed certificates (they are probed without verification).
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt)) if verify else ssl._create_unverified_context()
        if client_cert:
            ctx.load_cert_chain(str(self.pki.root / "admin.crt"), str(self.pki.root / "admin.key"))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=2)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        finally:
            conn.close()

    def _http_ok(self, port: int, path: str) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status == 200
        finally:
            conn.close()

    def _start(self, deadline: float) -> None:
        t = time.monotonic()
        if self.binaries is None:
            self.binaries = build_binaries(with_kubelet=self.kubelet_node, quiet=True, stream=False)
        self.binaries = dict(self.binaries)
        if self.kubelet_node and "kubelet" not in self.binaries:
            self.binaries.update(build_binaries(with_kubelet=True, quiet=True, stream=False))
        self.timings["binaries"] = time.monotonic() - t
        self.logs.mkdir(parents=True, exist_ok=True)
        w = self.workdir
        for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"):
            self.ports[name] = free_port()
        if self.kubelet_node:
            for name in ("kubelet", "kubelet-healthz", "kube-proxy-healthz", "kube-proxy-metrics"):
                self.ports[name] = free_port()
        self.server = f"https://127.0.0.1:{self.ports['apiserver']}"

        # PKI ----------------------------------------------------------------
        t = time.monotonic()
        self.pki = pki = PKI(w / "pki")
        pki.make_ca()
        sans = ["127.0.0.1", "localhost", SERVICE_IP, "kubernetes", "kubernetes.default",
                "kubernetes.default.svc", f"kubernetes.default.svc.{CLUSTER_DOMAIN}"]  # fmt: skip
        apiserver_crt, apiserver_key = pki.make_cert("apiserver", "kube-apiserver", server_names=sans)
        etcd_crt, etcd_key = pki.make_cert("etcd", "etcd", server_names=["127.0.0.1", "localhost"])
        etcd_client_crt, etcd_client_key = pki.make_cert("apiserver-etcd-client", "kube-apiserver-etcd-client")
        admin_crt, admin_key = pki.make_cert("admin", "kubernetes-admin", org="system:masters")
        kcm_crt, kcm_key = pki.make_cert("controller-manager", "system:kube-controller-manager")
        sched_crt, sched_key = pki.make_cert("scheduler", "system:kube-scheduler")
        kwok_crt, kwok_key = pki.make_cert("kwok", "kwok-controller", org="system:masters")
        if self.kubelet_node:
            knode = _load_kubelet_node()
            # The API server's client certificate for kubelets (logs, exec, port-forward), as kubeadm makes it.
            kubelet_client = pki.make_cert(
                "apiserver-kubelet-client", "kube-apiserver-kubelet-client", org="system:masters"
            )
        sa_key, sa_pub = pki.make_keypair("sa")
        # Front proxy (aggregation layer), as kubeadm sets it up: its own CA and client certificate.
        front_ca, _ = pki.make_ca("front-proxy-ca", "front-proxy-ca")
        proxy_crt, proxy_key = pki.make_cert("front-proxy-client", "front-proxy-client", ca="front-proxy-ca")
        self.timings["pki"] = time.monotonic() - t

        # etcd ---------------------------------------------------------------
        etcd_url = f"https://127.0.0.1:{self.ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn(
            "etcd",
            [
                "--name=etcd0",
                f"--data-dir={w / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=etcd0={peer_url}",
                "--initial-cluster-state=new",
                f"--cert-file={etcd_crt}",
                f"--key-file={etcd_key}",
                f"--trusted-ca-file={pki.ca_crt}",
                "--client-cert-auth=true",
                "--unsafe-no-fsync=true",  # a throw-away test cluster: speed over durability
                "--log-level=warn",
                "--quota-backend-bytes=1073741824",
            ],
        )
        # etcd's /health needs a client cert signed by the CA; the admin cert is one.
        self._wait("etcd", lambda: self._https_ok(self.ports["etcd"], "/health"), deadline)

        # kube-apiserver -----------------------------------------------------
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={etcd_url}",
                f"--etcd-cafile={pki.ca_crt}",
                f"--etcd-certfile={etcd_client_crt}",
                f"--etcd-keyfile={etcd_client_key}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}",
                f"--cert-dir={w / 'apiserver-certs'}",
                f"--tls-cert-file={apiserver_crt}",
                f"--tls-private-key-file={apiserver_key}",
                f"--client-ca-file={pki.ca_crt}",
                f"--requestheader-client-ca-file={front_ca}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={proxy_crt}",
                f"--proxy-client-key-file={proxy_key}",
                "--authorization-mode=Node,RBAC",
                "--anonymous-auth=true",  # as upstream: /healthz,/readyz,/livez,/version readable
                f"--enable-admission-plugins={','.join(ADMISSION_PLUGINS)}",
                f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                "--profiling=false",
                # A loopback advertise address is refused by the lease reconciler; nothing in-cluster
                # reaches the API through the `kubernetes` Service here.
                "--endpoint-reconciler-type=none",
                "--event-ttl=1h",
                "--v=1",
                *(
                    [
                        f"--kubelet-client-certificate={kubelet_client[0]}",
                        f"--kubelet-client-key={kubelet_client[1]}",
                        f"--kubelet-certificate-authority={pki.ca_crt}",
                        "--kubelet-preferred-address-types=InternalIP,Hostname",
                    ]
                    if self.kubelet_node
                    else []
                ),
            ],
        )
        self._wait("kube-apiserver", lambda: self._https_ok(self.ports["apiserver"], "/readyz"), deadline)

        # kubeconfigs --------------------------------------------------------
        ca = pki.ca_crt
        write_kubeconfig(self.kubeconfig, self.server, ca, admin_crt, admin_key, "kubernetes-admin")
        kcm_kc = write_kubeconfig(w / "controller-manager.kubeconfig", self.server, ca, kcm_crt, kcm_key, "kcm")
        sched_kc = write_kubeconfig(w / "scheduler.kubeconfig", self.server, ca, sched_crt, sched_key, "sched")
        kwok_kc = write_kubeconfig(w / "kwok.kubeconfig", self.server, ca, kwok_crt, kwok_key, "kwok")

        # controller-manager, scheduler, kwok (in parallel) ------------------
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={kcm_kc}",
                f"--authentication-kubeconfig={kcm_kc}",
                f"--authorization-kubeconfig={kcm_kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['controller-manager']}",
                f"--cert-dir={w / 'controller-manager-certs'}",
                "--leader-elect=false",
                f"--controllers={','.join(CONTROLLERS)}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={ca}",
                f"--cluster-signing-cert-file={ca}",
                f"--cluster-signing-key-file={pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={sched_kc}",
                f"--authentication-kubeconfig={sched_kc}",
                f"--authorization-kubeconfig={sched_kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['scheduler']}",
                f"--cert-dir={w / 'scheduler-certs'}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        if self.nodes:  # kwok keeps the fake nodes Ready and plays their pods' lives
            self._spawn(
                "kwok",
                [
                    f"--kubeconfig={kwok_kc}",
                    f"--config={self.binaries['kwok-stages']}",
                    "--manage-all-nodes=false",
                    "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                    f"--cidr={POD_CIDR}",
                    "--node-ip=127.0.0.1",
                    f"--server-address=127.0.0.1:{self.ports['kwok']}",
                    "--node-lease-duration-seconds=40",
                ],
            )
        for node in self.nodes:  # as soon as the API is up; kwok and the node-lifecycle controller do the rest
            self._create_node(node)
        self._wait(
            "kube-controller-manager",
            lambda: self._https_ok(self.ports["controller-manager"], "/healthz", client_cert=False, verify=False),
            deadline,
        )
        self._wait(
            "kube-scheduler",
            lambda: self._https_ok(self.ports["scheduler"], "/healthz", client_cert=False, verify=False),
            deadline,
        )
        if self.nodes:
            self._wait("kwok", lambda: self._http_ok(self.ports["kwok"], "/healthz"), deadline)
            self._wait("nodes ready", lambda: all(self._node_ready(n) for n in self.nodes), deadline, interval=0.25)
        self._wait("default service account", self._default_sa, deadline, interval=0.25)
        if self.kubelet_node:
            self._start_kubelet_node(knode, deadline)

    def _start_kubelet_node(self, knode, deadline: float) -> None:
        """containerd + kubelet as node finetune-kubelet (see kubelet_node.py); state kept in state.json."""
        t = time.monotonic()
        store = self._lock_image_store()
        node = self._node = knode.KubeletNode(self.node_dir, image_store=store)
        self._save_node_state()  # from here on, stop() knows what to tear down
        try:
            node.prepare(
                server=self.server, apiserver_port=self.ports["apiserver"], pki=self.pki,
                kubelet_port=self.ports["kubelet"], healthz_port=self.ports["kubelet-healthz"],
                proxy_ports=(self.ports["kube-proxy-healthz"], self.ports["kube-proxy-metrics"]),
                admin_kubeconfig=self.kubeconfig, write_kubeconfig=write_kubeconfig,
            )  # fmt: skip
        finally:
            self._save_node_state()
        self.timings["kubelet node config"] = time.monotonic() - t
        self.binaries["containerd"] = Path(knode.CONTAINERD)
        proc = self._spawn("containerd", [], argv=node.containerd_argv())
        node.wait_namespace(proc.pid)
        self._save_node_state()
        self._wait("containerd", node.containerd_ready, deadline, interval=0.1)
        t = time.monotonic()
        node.prune_images(self.kubelet_images, log)
        for name, secs in node.import_images(self.kubelet_images).items():
            self.timings[f"import {name}"] = secs
        self.timings["image import"] = time.monotonic() - t
        deadline += self.timings["image import"]  # bounded by its own timeout; not part of the start budget
        t_kubelet = time.monotonic()
        self._spawn("kubelet", [], argv=node.kubelet_argv(self.binaries["kubelet"], proc.pid))
        self._wait("kubelet node ready", lambda: self._node_ready(knode.NODE_NAME), deadline, interval=0.2)
        self.timings["kubelet start -> node Ready"] = time.monotonic() - t_kubelet
        self._spawn("kube-proxy", [], argv=node.kube_proxy_argv(self.binaries["kube-proxy"]))
        self._spawn("coredns", [], argv=node.coredns_argv(self.binaries["coredns"]))
        self.binaries["provisioner"] = Path(sys.executable)
        pv_root = self.workdir / "volumes"
        self._spawn(
            "provisioner",
            [str(PROVISIONER_PY), f"--server={self.server}", f"--ca={self.pki.ca_crt}",
             f"--cert={self.pki.root / 'admin.crt'}", f"--key={self.pki.root / 'admin.key'}", f"--root={pv_root}"],
        )  # fmt: skip
        gw = node.state["gateway"]
        self._wait("kube-proxy", lambda: self._http_ok(self.ports["kube-proxy-healthz"], "/healthz"), deadline)
        self._wait("coredns", lambda: _tcp_ok(gw, 53), deadline)
        self._wait("provisioner", lambda: (pv_root / ".ready").exists(), deadline, interval=0.05)

    def _lock_image_store(self) -> Path | None:
        """containerd's root kept between sessions (kubelet_image_dir()/containerd): the images stay imported,
        a new content key replaces the old image. Locked for this process's lifetime (one node at a time uses
        it); detached clusters and a store locked by another session get a private root instead."""
        if self.detach:
            return None
        import fcntl

        store = kubelet_image_dir() / "containerd"
        store.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(store.parent / "containerd.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log(f"{store} is in use by another session: this node imports its images into its work dir")
            return None
        self._store_lock = fd
        return store

    def _save_node_state(self) -> None:
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        state["kubelet_node"] = self._node.state if self._node else {}
        self.state_file.write_text(json.dumps(state, indent=2))

    def _node_ready(self, name: str) -> bool:
        status, node = self.api("GET", f"/api/v1/nodes/{name}")
        if status != 200:
            return False
        conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
        taints = [t["key"] for t in node.get("spec", {}).get("taints", [])]
        return conds.get("Ready") == "True" and not any(k.startswith("node.kubernetes.io/") for k in taints)

    def _create_node(self, name: str) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {"kubernetes.io/arch": "amd64", "kubernetes.io/os": "linux",
                           "kubernetes.io/hostname": name, "type": "kwok"},
            },
            "status": {
                "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "500Gi"},
                "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "500Gi"},
            },
        }  # fmt: skip
        status, body = self.api("POST", "/api/v1/nodes", node)
        if status not in (200, 201, 409):
            raise ClusterError(f"creating node {name}: HTTP {status}: {body}")

    def _default_sa(self) -> bool:
        status, _ = self.api("GET", "/api/v1/namespaces/default/serviceaccounts/default")
        return status == 200


# ---------------------------------------------------------------------------------------------- CLI
def _default_workdir() -> Path:
    return Path(os.environ.get("FINETUNE_TESTENV_DIR") or Path(tempfile.gettempdir()) / "finetune-testenv")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["up", "start", "stop", "status", "build"])
    ap.add_argument(
        "--workdir", type=Path, default=None, help="default: $FINETUNE_TESTENV_DIR or /tmp/finetune-testenv"
    )
    ap.add_argument("--nodes", type=int, default=0, help="kwok fake nodes (pods scheduled, nothing runs)")
    ap.add_argument("--with-kubelet", action="store_true", help="build: also build the kubelet")
    ap.add_argument(
        "--kubelet-node",
        action="store_true",
        help="also run the real node: containerd + kubelet, kube-proxy, CoreDNS (see kubelet_node.py); without "
        "it the cluster has no node",
    )
    ap.add_argument(
        "--kubelet-image",
        action="append",
        default=None,
        type=Path,
        help="image archive (docker save / OCI) to import into the kubelet node's containerd (repeatable; "
        "default: $FINETUNE_KUBELET_IMAGES or every *.tar in ~/.cache/finetune-operator/testenv/images)",
    )
    args = ap.parse_args(argv)

    if args.command == "build":
        for k, v in build_binaries(with_kubelet=args.with_kubelet).items():
            print(f"{k}={v}")
        return 0

    workdir = args.workdir or _default_workdir()
    if args.command in ("stop", "status"):
        c = LocalCluster(workdir)
        if args.command == "status":
            stray = c.stray_pids()
            print(json.dumps({"workdir": str(workdir), "running": stray}, indent=2))
            return 0 if stray else 1
        c.stop()
        left = c.stray_pids()
        if left:
            print(f"still running: {left}", file=sys.stderr)
            return 1
        return 0

    if workdir.exists() and LocalCluster(workdir).stray_pids():
        print(f"a cluster is already running in {workdir}; run `stop` first", file=sys.stderr)
        return 1
    if workdir.exists():
        shutil.rmtree(workdir)
    c = LocalCluster(
        workdir,
        nodes=args.nodes,
        detach=args.command == "start",
        kubelet_node=args.kubelet_node,
        kubelet_images=args.kubelet_image,
    )
    try:
        c.start()
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rss = c.rss_bytes()
    print(f"# control plane RSS: {sum(rss.values()) / 2**20:.0f} MiB "
          + ", ".join(f"{k}={v / 2**20:.0f}" for k, v in rss.items()), file=sys.stderr)  # fmt: skip
    print(f"export KUBECONFIG={c.kubeconfig}")
    if args.command == "start":
        return 0
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # also when started with SIGINT ignored
        signal.signal(sig, lambda *_: stop.append(1))
    try:
        while not stop:
            c._check_running()
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
    finally:
        c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
