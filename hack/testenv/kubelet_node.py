#!/usr/bin/env python3
"""A real node for the local cluster: the upstream kubelet + Debian's containerd (CRI), pods from local images.

Used by cluster.py (`LocalCluster(kubelet_node=True)`, `cluster.py start --kubelet-node`); Python standard
library only. What it sets up, all of it under `<cluster workdir>/kubelet-node/` and torn down by PID:

    containerd   /usr/bin/containerd (Debian 1.6), CRI plugin, runc through hack/images/runc-wrapper (drops
                 CAP_SYS_RESOURCE and negative oom_score_adj, which this VM cannot grant), overlayfs,
                 sandbox image = the locally built pause image (hack/images/build-pause.sh), CNI from Debian's
                 containernetworking-plugins (bridge + host-local), everything in the work dir
    kubelet      the kubelet built by hack/testenv/build.sh --with-kubelet, node `finetune-kubelet`, client
                 certificate system:node:finetune-kubelet (Node authorizer + NodeRestriction), serving
                 certificate from the cluster CA, webhook authn/authz (so `kubectl logs` works through the
                 API server), cgroupfs driver under its own cgroup root, image GC off (no registry to pull
                 evicted images back from); the cluster's only node, untainted

Both run in a private mount namespace (`unshare --mount --propagation private`; the kubelet joins it with
`nsenter`): a tmpfs on /run (containerd's shim sockets under /run/containerd/s are a fixed path), the work
dir's var-log/ on /var/log (the kubelet's /var/log/containers symlinks are a fixed path), and regular files
bound over the sysctls the kubelet insists on changing (vm.overcommit_memory, kernel.panic,
kernel.panic_on_oops, ...): it "changes" copies; the host's values are never touched. Pod mounts, rootfs
overlays and network-namespace files live only in that namespace: when its last process is gone, so are
they.

Pod network: a bridge (`ftk-<id>`, 10.245.N.0/24) made here, CNI bridge + host-local on it, no masquerade
(pods reach nothing outside the node). Pods reach the API server as in a real cluster, through the
`kubernetes` Service (10.96.0.1:443): one DNAT rule in a chain of our own (what kube-proxy would do) sends it
to the API server on 127.0.0.1 (`route_localnet` on our bridge only). kube-proxy (iptables) serves the other
Services and CoreDNS their names (kube_proxy_argv, coredns_argv; cluster.py starts both).

Teardown (stop()): kubelet SIGTERM; every process in the node's cgroup tree (the pods) SIGKILL; containerd
SIGTERM; every process left in the private mount namespace (the runc shims) SIGKILL; cgroups removed;
iptables chain and bridge deleted. `stray()` lists what is left (cluster.stray_pids includes it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUNC_WRAPPER = REPO / "hack" / "images" / "runc-wrapper"
BUILD_PAUSE = REPO / "hack" / "images" / "build-pause.sh"

NODE_NAME = "finetune-kubelet"
NODE_LABEL = "finetune.dev/kubelet-node"
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service (first address of cluster.py's service range)
CLUSTER_DOMAIN = "cluster.local"

CONTAINERD = "/usr/bin/containerd"
CNI_BIN_DIRS = ["/usr/lib/cni", "/opt/cni/bin"]
# What the kubelet sets at start-up (pkg/kubelet/cm: setupKernelTunables); bound over with copies.
KUBELET_SYSCTLS = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
]
# The CNI bridge plugin turns on forwarding (isGateway); pods here only talk to the node itself.
CNI_SYSCTLS = ["net/ipv4/ip_forward"]
CGROUP_V1 = Path("/sys/fs/cgroup")


class NodeError(RuntimeError):
    pass


def _run(*cmd: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return proc


def _normalized(image: str) -> str:
    """containerd's name for a Docker image name (finetune-x:tag -> docker.io/library/finetune-x:tag)."""
    if "/" not in image:
        return f"docker.io/library/{image}"
    first = image.split("/", 1)[0]
    return image if "." in first or ":" in first or first == "localhost" else f"docker.io/{image}"


def cni_bin_dir() -> str | None:
    for d in CNI_BIN_DIRS:
        if all(Path(d, p).exists() for p in ("bridge", "host-local", "loopback")):
            return d
    return None


def preflight() -> list[str]:
    """What is missing on this host for a kubelet node (empty: nothing)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (containerd, kubelet, mounts, cgroups)")
    if not Path(CONTAINERD).exists():
        problems.append(f"{CONTAINERD} missing (Debian: apt-get install containerd)")
    for tool in ("runc", "ctr", "unshare", "nsenter", "ip", "iptables", "gcc"):
        if not shutil.which(tool):
            problems.append(f"{tool} not found (Debian: runc, containerd, util-linux, iproute2, iptables, gcc)")
    if not cni_bin_dir():
        problems.append("CNI plugins missing (Debian: apt-get install containernetworking-plugins)")
    if not (CGROUP_V1 / "memory").is_dir() and not (CGROUP_V1 / "cgroup.controllers").exists():
        problems.append("no cgroup hierarchy at /sys/fs/cgroup")
    return problems


def cgroup_v2() -> bool:
    return (CGROUP_V1 / "cgroup.controllers").exists()


def mnt_ns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


def _procs_in_ns(ns: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(p / "ns" / "mnt") == ns:
                    out.append(int(p.name))
    return out


def _cgroup_dirs(root: str) -> list[Path]:
    """Every directory of the cgroup tree `root` in every hierarchy, deepest first."""
    bases = [CGROUP_V1] if cgroup_v2() else [d for d in CGROUP_V1.iterdir() if d.is_dir() and not d.is_symlink()]
    out = []
    for base in bases:
        top = base / root.strip("/")
        if top.is_dir():
            out += sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            out.append(top)
    return out


def _procs_in_cgroup(root: str) -> list[int]:
    pids: set[int] = set()
    for d in _cgroup_dirs(root):
        with contextlib.suppress(OSError):
            pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
    return sorted(pids)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return ") Z " not in stat


def _kill_all(pids_fn, sig: int, wait: float) -> list[int]:
    """Send `sig` to every PID `pids_fn()` returns until none is left or `wait` s passed; return the rest."""
    deadline = time.monotonic() + wait
    while True:
        pids = [p for p in pids_fn() if p != os.getpid() and _alive(p)]
        if not pids or time.monotonic() >= deadline:
            return pids
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        time.sleep(0.1)


class KubeletNode:
    """containerd + kubelet for LocalCluster; `spawn(name, argv, exe)` is the cluster's child launcher."""

    def __init__(self, root: Path, state: dict | None = None, image_store: Path | None = None):
        """image_store: containerd's root kept between sessions (its images stay imported; the caller holds its
        lock: one node at a time); None: a root in the work dir, gone with it."""
        self.root = root
        self.state: dict = state or {}
        self.image_store = image_store

    # ------------------------------------------------------------------ set-up
    def prepare(self, *, server: str, apiserver_port: int, pki, kubelet_port: int, healthz_port: int,
                proxy_ports: tuple[int, int], admin_kubeconfig: Path, write_kubeconfig) -> None:  # fmt: skip
        """Certificates (from cluster.py's PKI), config files, the bridge, iptables chain and cgroup root.

        The node's address is the bridge's gateway address: the kubelet refuses a loopback node IP, and the
        API server reaches the kubelet (logs) there.
        """
        problems = preflight()
        if problems:
            raise NodeError("kubelet node: " + "; ".join(problems))
        r = self.root
        for d in ("containerd", "cni/net.d", "cni/ipam", "kubelet", "var-log", "sysctl", "kube-proxy", "coredns"):
            (r / d).mkdir(parents=True, exist_ok=True)
        ident = hashlib.sha256(str(r).encode()).hexdigest()[:6]
        subnet_n = self._free_subnet()
        st = self.state
        st.update(
            {
                "root": str(r),
                "containerd_root": str(self.image_store or r / "containerd" / "root"),
                "shared_store": self.image_store is not None,
                "id": ident,
                "bridge": f"ftk-{ident}",
                "chain": f"FTK-{ident.upper()}",
                "subnet": f"10.245.{subnet_n}.0/24",
                "gateway": f"10.245.{subnet_n}.1",
                "cgroup_root": f"/finetune-kubelet-{ident}",
                "socket": str(r / "containerd" / "containerd.sock"),
                "kubelet_port": kubelet_port,
                "healthz_port": healthz_port,
                "proxy_ports": proxy_ports,
                "apiserver_port": apiserver_port,
                "host_sysctls": {k: Path("/proc/sys", k).read_text().strip() for k in KUBELET_SYSCTLS + CNI_SYSCTLS},
            }
        )
        pause = self._pause_image()
        st["pause_image"], st["pause_tar"] = pause
        # Client certificate: the Node authorizer and NodeRestriction treat it as this node's kubelet.
        node_crt, node_key = pki.make_cert("kubelet-node", f"system:node:{NODE_NAME}", org="system:nodes")
        serving = pki.make_cert("kubelet-serving", NODE_NAME, server_names=[st["gateway"], "127.0.0.1", NODE_NAME])
        ca = pki.ca_crt
        self._containerd_config()
        self._cni_config()
        write_kubeconfig(r / "kubelet.kubeconfig", server, ca, node_crt, node_key, f"system:node:{NODE_NAME}")
        # kube-proxy as kubeadm runs it: user system:kube-proxy, bound to system:node-proxier by default RBAC.
        proxy_crt, proxy_key = pki.make_cert("kube-proxy", "system:kube-proxy")
        write_kubeconfig(r / "kube-proxy.kubeconfig", server, ca, proxy_crt, proxy_key, "system:kube-proxy")
        self._kubelet_config(ca, *serving)
        self._kube_proxy_config()
        self._coredns_config(admin_kubeconfig)
        self._network()
        self._cgroup_root()

    def containerd_argv(self) -> list[str]:
        """containerd in a new private mount namespace, after the binds described in the module doc."""
        r = self.root
        binds = [
            "mount -t tmpfs -o mode=0755 tmpfs /run",
            "mkdir -p /run/containerd",
            f"mount --bind {r}/var-log /var/log",
        ]
        for k in KUBELET_SYSCTLS + CNI_SYSCTLS:
            copy = r / "sysctl" / k.replace("/", ".")
            copy.write_text(self.state["host_sysctls"][k] + "\n")
            binds.append(f"mount --bind {copy} /proc/sys/{k}")
        script = " && ".join(binds) + f" && exec {CONTAINERD} --config {r / 'containerd' / 'config.toml'}"
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec", script]

    def wait_namespace(self, pid: int, timeout: float = 10.0) -> str:
        """The private mount namespace of containerd (`pid`), once unshare has made it."""
        host = mnt_ns("self")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                ns = mnt_ns(pid)
                if ns != host:
                    self.state["mnt_ns"] = ns
                    return ns
            time.sleep(0.01)
        raise NodeError("containerd did not enter its own mount namespace")

    def containerd_ready(self) -> bool:
        sock = self.state["socket"]
        return Path(sock).exists() and _run("ctr", "--address", sock, "version", check=False, timeout=5).returncode == 0

    def import_images(self, images: list[str]) -> dict[str, float]:
        """`ctr -n k8s.io images import` the pause image and `images`: archives (docker save / OCI), or names of
        Docker images, streamed from `docker save` (no archive on disk: the trainer image is several GB)."""
        times = {}
        ctr = ["ctr", "--address", self.state["socket"], "-n", "k8s.io", "images", "import"]
        present = set(self.images())
        for item in [self.state["pause_tar"], *images]:
            t = time.monotonic()
            if _normalized(item) in present:  # a content-keyed tag already in the kept store: same image
                times[f"{Path(item).name} (kept)"] = 0.0
                continue
            if Path(item).is_file():
                _run(*ctr, item, timeout=900)
            else:
                self._import_from_docker(ctr, item)
            times[Path(item).name] = time.monotonic() - t
        return times

    @staticmethod
    def _import_from_docker(ctr: list[str], image: str) -> None:
        docker = shutil.which("docker") or "docker"
        save = subprocess.Popen([docker, "save", image], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            imp = subprocess.run([*ctr, "-"], stdin=save.stdout, capture_output=True, text=True, timeout=900,
                                 check=False)  # fmt: skip
        finally:
            save.stdout.close()
            save_err = save.stderr.read().decode(errors="replace")
            save.wait(60)
        if save.returncode != 0 or imp.returncode != 0:
            raise NodeError(f"docker save {image} | ctr import failed: {save_err.strip()[-800:]} "
                            f"{imp.stderr.strip()[-800:]}")  # fmt: skip

    def prune_images(self, keep: list[str], log) -> list[str]:
        """Remove the project's images (finetune-*:c<key>, the content-keyed tags) that are not in `keep`, and the
        image-ID references (`sha256:<id>`, added by the CRI plugin for every image it sees) that no remaining
        tag points to: those keep every layer ever imported alive. Run before the import: the old layers are
        gone before the new ones land (the store's peak is one trainer image, not two)."""
        wanted = {_normalized(k) for k in keep}
        rows = self._image_rows()
        old = [ref for ref, _ in rows if ref.startswith("docker.io/library/finetune-") and ":c" in ref
               and ref not in wanted]  # fmt: skip
        tagged = {digest for ref, digest in rows if not ref.startswith("sha256:") and ref not in old}
        orphans = [ref for ref, digest in rows if ref.startswith("sha256:") and digest not in tagged]
        if old or orphans:  # --sync: containerd's garbage collector has freed the layers when this returns
            _run("ctr", "--address", self.state["socket"], "-n", "k8s.io", "images", "rm", "--sync", *old, *orphans,
                 check=False, timeout=600)  # fmt: skip
            log(f"removed from the node's store: {old or 'no old tags'}, {len(orphans)} unreferenced image IDs")
        return old

    def remove_containers(self, log) -> None:
        """Delete every container record (and its snapshot) in the CRI namespace: a kept store starts the next
        session with images only. Run after the kubelet and the pods are gone, containerd still up."""
        ctr = ["ctr", "--address", self.state["socket"], "-n", "k8s.io"]
        ids = _run(*ctr, "containers", "ls", "-q", check=False).stdout.split()
        for cid in ids:  # the pods were killed; their shims hold exited tasks, which block the delete
            _run(*ctr, "tasks", "rm", "-f", cid, check=False, timeout=30)
        if ids:
            proc = _run(*ctr, "containers", "rm", *ids, check=False, timeout=120)
            if proc.returncode != 0:
                log(f"ctr containers rm: {proc.stderr.strip()[-500:]}")

    def images(self) -> list[str]:
        return [ref for ref, _ in self._image_rows() if not ref.startswith("sha256:")]

    def _image_rows(self) -> list[tuple[str, str]]:
        """(reference, target digest) of every image in the CRI namespace (`ctr images ls`: REF TYPE DIGEST ...)."""
        out = _run("ctr", "--address", self.state["socket"], "-n", "k8s.io", "images", "ls").stdout
        rows = [line.split() for line in out.splitlines()[1:]]
        return [(row[0], row[2]) for row in rows if len(row) >= 3]

    def kubelet_argv(self, kubelet: Path, containerd_pid: int) -> list[str]:
        r = self.root
        return [
            "nsenter", f"--mount=/proc/{containerd_pid}/ns/mnt", "--",
            str(kubelet),
            f"--config={r / 'kubelet' / 'config.json'}",
            f"--kubeconfig={r / 'kubelet.kubeconfig'}",
            f"--root-dir={r / 'kubelet' / 'root'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={self.state['gateway']}",
            f"--node-labels={NODE_LABEL}=true",
            "--v=2",
        ]  # fmt: skip

    # ------------------------------------------------------------------ teardown
    def stop(self, kubelet_pid: int | None, containerd_pid: int | None, is_ours, log) -> dict[str, float]:
        """Stop everything stop() in the module doc lists; `is_ours(pid, exe)` guards against reused PIDs."""
        st, times = self.state, {}
        t = time.monotonic()
        if kubelet_pid and is_ours(kubelet_pid, None):
            os.kill(kubelet_pid, signal.SIGTERM)
            if _kill_all(lambda: [kubelet_pid], 0, 10.0):
                log(f"kubelet (pid {kubelet_pid}) still running 10 s after SIGTERM; killing it")
                _kill_all(lambda: [kubelet_pid], signal.SIGKILL, 5.0)
        times["stop kubelet"] = time.monotonic() - t
        t = time.monotonic()
        cg = st.get("cgroup_root")
        if cg:
            left = _kill_all(lambda: _procs_in_cgroup(cg), signal.SIGKILL, 10.0)
            if left:
                log(f"pod processes still alive after SIGKILL: {left}")
        times["stop pods"] = time.monotonic() - t
        t = time.monotonic()
        if st.get("shared_store") and containerd_pid and is_ours(containerd_pid, CONTAINERD):
            self.remove_containers(log)
        times["remove containers"] = time.monotonic() - t
        t = time.monotonic()
        if containerd_pid and is_ours(containerd_pid, CONTAINERD):
            os.kill(containerd_pid, signal.SIGTERM)
            if _kill_all(lambda: [containerd_pid], 0, 10.0):
                _kill_all(lambda: [containerd_pid], signal.SIGKILL, 5.0)
        ns = st.get("mnt_ns")
        if ns and ns != mnt_ns("self"):
            left = _kill_all(lambda: _procs_in_ns(ns), signal.SIGKILL, 10.0)
            if left:
                log(f"processes still in the node's mount namespace: {left}")
        times["stop containerd"] = time.monotonic() - t
        self._cleanup_host(log)
        return times

    def container_cgroup(self, controller: str, pod_uid: str, container_id: str) -> Path | None:
        """The cgroup directory of a container (`controller`: memory, cpu; ignored on cgroup v2), or None."""
        base = CGROUP_V1 if cgroup_v2() else CGROUP_V1 / controller
        top = base / self.state["cgroup_root"].strip("/")
        uid = pod_uid.replace("-", "_") if cgroup_v2() else pod_uid
        hits = [p for p in top.rglob(container_id) if p.is_dir() and p.parent.name == f"pod{uid}"]
        return hits[0] if hits else None

    def stray(self) -> dict[str, int]:
        out = {}
        ns = self.state.get("mnt_ns")
        if ns and ns != mnt_ns("self"):
            out.update({f"kubelet-node ns pid {p}": p for p in _procs_in_ns(ns) if _alive(p)})
        cg = self.state.get("cgroup_root")
        if cg:
            out.update({f"kubelet-node pod pid {p}": p for p in _procs_in_cgroup(cg) if _alive(p)})
        return out

    def _cleanup_host(self, log) -> None:
        st = self.state
        cg = st.get("cgroup_root")
        if cg:
            for d in _cgroup_dirs(cg):
                try:
                    d.rmdir()
                except OSError as e:
                    log(f"cannot remove cgroup {d}: {e}")
        chain, bridge = st.get("chain"), st.get("bridge")
        if chain:
            rule = ["-t", "nat", "-D", "PREROUTING", "-i", bridge, "-j", chain]
            while _run("iptables", "-w", *rule, check=False).returncode == 0:
                pass
            _run("iptables", "-w", "-t", "nat", "-F", chain, check=False)
            _run("iptables", "-w", "-t", "nat", "-X", chain, check=False)
            while _run("iptables", "-w", "-D", "FORWARD", "-j", chain, check=False).returncode == 0:
                pass
            _run("iptables", "-w", "-F", chain, check=False)
            _run("iptables", "-w", "-X", chain, check=False)
        if bridge and Path(f"/sys/class/net/{bridge}").exists():
            _run("ip", "link", "del", bridge, check=False)
        # The host's sysctls were never exposed to the kubelet; check they are what they were.
        for k, v in st.get("host_sysctls", {}).items():
            with contextlib.suppress(OSError):
                now = Path("/proc/sys", k).read_text().strip()
                if now != v:
                    log(f"sysctl {k} changed to {now} while the node ran; restoring {v}")
                    Path("/proc/sys", k).write_text(v + "\n")

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _free_subnet() -> int:
        used = (
            _run("ip", "-4", "-o", "addr", "show", check=False).stdout + _run("ip", "-4", "route", check=False).stdout
        )
        for n in range(10, 250):
            if f"10.245.{n}." not in used:
                return n
        raise NodeError("no free 10.245.N.0/24 subnet for the pod bridge")

    @staticmethod
    def _pause_image() -> tuple[str, str]:
        proc = _run("bash", str(BUILD_PAUSE), timeout=300)
        kv = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
        return kv["pause-image"], kv["pause-tar"]

    def _containerd_config(self) -> None:
        r, st = self.root / "containerd", self.state
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        toml = f"""version = 2
root = "{st["containerd_root"]}"
state = "{r / "state"}"
oom_score = 0
# no /opt/containerd (the opt plugin), no snapshotters this host cannot use
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{st["socket"]}"
[ttrpc]
  address = "{st["socket"]}.ttrpc"
[debug]
  address = ""
  level = "info"
[metrics]
  address = ""

[{cri}]
  sandbox_image = "{st["pause_image"]}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        BinaryName = "{RUNC_WRAPPER}"
        Root = "{r / "runc"}"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{cni_bin_dir()}"
    conf_dir = "{self.root / "cni" / "net.d"}"
    max_conf_num = 1
"""
        (r / "config.toml").write_text(toml)

    def _cni_config(self) -> None:
        st = self.state
        conf = {
            "cniVersion": "1.0.0",
            "name": "finetune-kubelet",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": st["bridge"],
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": st["subnet"], "gateway": st["gateway"]}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.root / "cni" / "ipam"),
                    },
                }
            ],
        }
        (self.root / "cni" / "net.d" / "10-finetune.conflist").write_text(json.dumps(conf, indent=2))

    def _kubelet_config(self, ca: Path, serving_crt: Path, serving_key: Path) -> None:
        st = self.state
        cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": st["gateway"],
            "port": st["kubelet_port"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": st["healthz_port"],
            "tlsCertFile": str(serving_crt),
            "tlsPrivateKeyFile": str(serving_key),
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(ca)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{st['socket']}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": st["cgroup_root"],
            "cgroupsPerQOS": True,
            "enforceNodeAllocatable": ["pods"],
            "failSwapOn": False,
            # cgroup v1 hosts: kubelets from 1.35 refuse to start on v1 without this.
            **({} if cgroup_v2() else {"failCgroupV1": False}),
            "oomScoreAdj": 0,  # -999 needs CAP_SYS_RESOURCE, which this VM lacks
            # Nothing can be pulled again here: never garbage-collect images, evict only when nearly full.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%"},
            "registerNode": True,
            # Cluster DNS: CoreDNS on the bridge's gateway address (see coredns_argv). The host's resolv.conf
            # is not passed on: its servers (often a loopback stub) are unreachable from pod networks.
            "clusterDNS": [st["gateway"]],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(self.root / "kubelet" / "resolv.conf"),
            "syncFrequency": "10s",
            "fileCheckFrequency": "20s",
            "nodeStatusUpdateFrequency": "5s",
            "nodeStatusReportFrequency": "30s",
            "serializeImagePulls": False,
            "maxPods": 110,
            "containerLogMaxSize": "10Mi",
            "containerLogMaxFiles": 2,
            "shutdownGracePeriod": "0s",
        }
        (self.root / "kubelet" / "config.json").write_text(json.dumps(cfg, indent=2))
        (self.root / "kubelet" / "resolv.conf").write_text("")

    def _kube_proxy_config(self) -> None:
        """iptables mode, masquerading all Service traffic: a pod reaching a Service backed by a pod on the same
        bridge gets its reply through the node (no br_netfilter here), and no conntrack sysctls are touched."""
        st = self.state
        health, metrics = st["proxy_ports"]
        cfg = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(self.root / "kube-proxy.kubeconfig")},
            "hostnameOverride": NODE_NAME,
            "bindAddress": st["gateway"],
            "healthzBindAddress": f"127.0.0.1:{health}",
            "metricsBindAddress": f"127.0.0.1:{metrics}",
            "clusterCIDR": st["subnet"],
            "detectLocalMode": "ClusterCIDR",
            "nodePortAddresses": [f"{st['gateway']}/32"],
            "iptables": {"masqueradeAll": True, "localhostNodePorts": False, "syncPeriod": "5s",
                         "minSyncPeriod": "0s"},
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }
        (self.root / "kube-proxy" / "config.json").write_text(json.dumps(cfg, indent=2))

    def _coredns_config(self, admin_kubeconfig: Path) -> None:
        """Service and pod names (Indexed-Job hostnames through their headless Service) for cluster.local only;
        nothing is forwarded upstream (pods here reach nothing outside the node)."""
        gw = self.state["gateway"]
        corefile = f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {gw}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {admin_kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 2
}}
.:53 {{
    bind {gw}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""
        (self.root / "coredns" / "Corefile").write_text(corefile)

    def kube_proxy_argv(self, kube_proxy: Path) -> list[str]:
        """kube-proxy in the host's namespaces (it shares the host's iptables lock, /run/xtables.lock); the
        configuration above leaves every sysctl alone (no conntrack tuning, no localhost NodePorts)."""
        return [str(kube_proxy), f"--config={self.root / 'kube-proxy' / 'config.json'}", "--v=1"]

    def coredns_argv(self, coredns: Path) -> list[str]:
        return [str(coredns), "-conf", str(self.root / "coredns" / "Corefile")]

    def kube_proxy_cleanup(self, kube_proxy: Path, log) -> None:
        """Remove the iptables chains and rules kube-proxy (`kube-proxy --cleanup`) and the kubelet made
        (its canary chains, KUBE-IPTABLES-HINT and the KUBE-FIREWALL rule that drops outside traffic to
        127.0.0.0/8): they outlive both processes."""
        proc = _run(str(kube_proxy), "--cleanup", f"--config={self.root / 'kube-proxy' / 'config.json'}",
                    check=False, timeout=60)  # fmt: skip
        if proc.returncode != 0:
            log(f"kube-proxy --cleanup failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        for hook in ("INPUT", "OUTPUT"):
            while _run("iptables", "-w", "-D", hook, "-j", "KUBE-FIREWALL", check=False).returncode == 0:
                pass
        for table, chain in (("filter", "KUBE-FIREWALL"), ("filter", "KUBE-KUBELET-CANARY"),
                             ("nat", "KUBE-KUBELET-CANARY"), ("mangle", "KUBE-KUBELET-CANARY"),
                             ("mangle", "KUBE-IPTABLES-HINT")):  # fmt: skip
            _run("iptables", "-w", "-t", table, "-F", chain, check=False)
            _run("iptables", "-w", "-t", table, "-X", chain, check=False)

    def _network(self) -> None:
        st = self.state
        br, gw, chain = st["bridge"], st["gateway"], st["chain"]
        if not Path(f"/sys/class/net/{br}").exists():
            _run("ip", "link", "add", br, "type", "bridge")
        _run("ip", "addr", "replace", f"{gw}/24", "dev", br)
        _run("ip", "link", "set", br, "up")
        # Let pods reach the API server on 127.0.0.1 through a DNAT on this bridge only.
        Path(f"/proc/sys/net/ipv4/conf/{br}/route_localnet").write_text("1\n")
        _run("iptables", "-w", "-t", "nat", "-N", chain, check=False)
        _run("iptables", "-w", "-t", "nat", "-F", chain)
        _run(
            "iptables", "-w", "-t", "nat", "-A", chain, "-d", f"{SERVICE_IP}/32", "-p", "tcp", "--dport", "443",
            "-j", "DNAT", "--to-destination", f"127.0.0.1:{st['apiserver_port']}",
        )  # fmt: skip
        _run("iptables", "-w", "-t", "nat", "-I", "PREROUTING", "-i", br, "-j", chain)
        # Pod -> Service -> pod is routed through the node: forwarding on, and accepted on our bridge even where
        # Docker set the FORWARD policy to DROP.
        _run("iptables", "-w", "-N", chain, check=False)
        _run("iptables", "-w", "-F", chain)
        _run("iptables", "-w", "-A", chain, "-i", br, "-j", "ACCEPT")
        _run("iptables", "-w", "-A", chain, "-o", br, "-j", "ACCEPT")
        _run("iptables", "-w", "-I", "FORWARD", "-j", chain)
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")

    def _cgroup_root(self) -> None:
        """Create the kubelet's cgroup root in every v1 hierarchy (the kubelet checks it exists)."""
        root = self.state["cgroup_root"].strip("/")
        if cgroup_v2():
            (CGROUP_V1 / root).mkdir(exist_ok=True)
            return
        for base in CGROUP_V1.iterdir():
            if not base.is_dir() or base.is_symlink() or base.name == "unified":
                continue
            d = base / root
            d.mkdir(exist_ok=True)
            if base.name.startswith("cpuset") or (base / "cpuset.cpus").exists():
                for f in ("cpuset.cpus", "cpuset.mems"):
                    if (d / f).exists() and not (d / f).read_text().strip():
                        (d / f).write_text((base / f).read_text())
