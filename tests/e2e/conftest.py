"""e2e fixtures: a kubeconfig for a real cluster.

Which cluster:
  * ``FINETUNE_E2E_KUBECONFIG`` or ``KUBECONFIG`` set  -> that cluster (kind, a real one); nothing is started.
    ``FINETUNE_E2E_LOCAL=1`` ignores ``KUBECONFIG`` and starts the local one anyway.
  * otherwise -> the local control plane of ``hack/testenv/cluster.py`` (etcd, kube-apiserver,
    kube-controller-manager, kube-scheduler) with one real node: Debian's containerd + the upstream kubelet,
    CNI bridge networking, kube-proxy, CoreDNS and a hostPath provisioner (``hack/testenv/kubelet_node.py``).
    Pods run the project's own images: ``hack/testenv/kubelet-images.sh`` builds the operator, trainer and
    serve images once per content, before the first test, and the node imports them. The operator is
    installed by Helm from the operator image and its trainer pods run the trainer image. It needs root;
    ``hack/testenv/deps.sh`` installs the system packages, ``hack/testenv/build.sh`` builds/caches the
    binaries. The cluster is started once per session and stopped by PID at the end (a leftover process — a
    component, a container or its shim — fails the session).

A failed e2e test gets the tails of the logs of the pods started during it as a report section, read as
``kubectl logs`` reads them (pods/log through the API server, from the kubelet).

When no cluster can be provisioned (no Go toolchain, build failure, ...) the e2e tests are skipped with the
reason, except with ``CI=true``, where that is a failure. The component logs of a session with a failed
e2e test are kept and their path is printed at the end of the run.

A cold build takes ~20 minutes on 2 cores. It runs once, after collection and before the first test (so
no test's timeout is spent on it), and only when e2e tests are selected and no cluster is given;
``hack/testenv/build.sh`` does the same ahead of time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# This folder on the path: tests/integration loads this file as a plain module for its helpers.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
# The operator installed once per session, shared by the operator, reliability and multi-worker modules.
from operator_env import jobs, operator_env, restricted_namespace  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
E2E_DIR = Path(__file__).resolve().parent

_failed_key = pytest.StashKey[bool]()
_report_key = pytest.StashKey[list]()
_build_key = pytest.StashKey[object]()  # {name: Path} from build.sh, or the ClusterError it raised
_images_key = pytest.StashKey[dict]()  # {"operator"|"trainer"|"serve": image} (kubelet-images.sh)
_cluster_key = pytest.StashKey[object]()  # the session's LocalCluster
_started_key = pytest.StashKey[float]()  # per test: when it started (time.time())


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _load_testenv():
    """Import hack/testenv/cluster.py (not a package on sys.path)."""
    name = "finetune_testenv_cluster"
    if name in sys.modules:
        return sys.modules[name]
    path = REPO / "hack" / "testenv" / "cluster.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _is_e2e(item) -> bool:
    return E2E_DIR in Path(str(item.fspath)).parents


def _given_kubeconfig() -> str | None:
    return os.environ.get("FINETUNE_E2E_KUBECONFIG") or (
        None if _truthy("FINETUNE_E2E_LOCAL") else os.environ.get("KUBECONFIG")
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_e2e(item):
            item.add_marker(pytest.mark.e2e)


def pytest_collection_finish(session):
    """Build/cache the control plane before the first test, outside every per-test timeout."""
    config = session.config
    if config.option.collectonly or _given_kubeconfig() or not any(_is_e2e(i) for i in session.items):
        return
    try:
        testenv = _load_testenv()
    except Exception as e:
        config.stash[_build_key] = e
        return
    capman = config.pluginmanager.getplugin("capturemanager")
    ctx = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
    with ctx:  # a cold build shows its progress live
        try:
            config.stash[_build_key] = testenv.build_binaries(with_kubelet=True, quiet=True, stream=True)
        except testenv.ClusterError as e:
            config.stash[_build_key] = e
            return
        problem = _install_deps(testenv) or _build_images(config, testenv)
        if problem:
            config.stash[_build_key] = testenv.ClusterError(problem)


def _install_deps(testenv) -> str | None:
    """Run hack/testenv/deps.sh (the node's system packages; a no-op when present)."""
    import subprocess

    proc = subprocess.run(["bash", str(testenv.DEPS_SH)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"{testenv.DEPS_SH.name} failed: {proc.stderr.strip()[-800:]}"
    return None


def _build_images(config, testenv) -> str | None:
    """hack/testenv/kubelet-images.sh: the operator, trainer and serve images (built once per content; warm:
    hashing)."""
    import subprocess

    script = REPO / "hack" / "testenv" / "kubelet-images.sh"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(script), "operator", "trainer", "serve"], stdout=subprocess.PIPE, text=True,
                          check=False, env={**os.environ, "DOCKER_HOST": _docker_host()})  # fmt: skip
    if proc.returncode != 0:
        return f"{script.name} failed (exit code {proc.returncode}); its output is above"
    images = dict(line.split("=", 1) for line in proc.stdout.split() if "=" in line)
    config.stash[_images_key] = images
    config.stash.setdefault(_report_key, []).append(
        f"e2e: images for the node ready in {time.monotonic() - t0:.1f} s: "
        + ", ".join(f"{k} {v}" for k, v in images.items())
    )
    return None


def _docker_host() -> str:
    """The Docker engine the images live in: $DOCKER_HOST, else the private one hack/images/dockerd.sh runs."""
    return os.environ.get("DOCKER_HOST") or "unix:///run/finetune-docker/docker.sock"


def pytest_runtest_setup(item):
    item.stash[_started_key] = time.time()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and E2E_DIR in Path(str(item.fspath)).parents:
        item.config.stash[_failed_key] = True
        cluster = item.config.stash.get(_cluster_key, None)
        if cluster is not None and hasattr(cluster, "pod_log_tails"):
            for name, tail in cluster.pod_log_tails(since=item.stash.get(_started_key, 0.0) - 1):
                report.sections.append((f"pod log {name} (tail)", tail))
    return report


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for line in config.stash.get(_report_key, []):
        terminalreporter.write_line(line)


def _unavailable(msg: str):
    """Skip (or, under CI=true, fail) every test that needs a cluster."""
    if _truthy("CI"):
        pytest.fail(f"e2e: could not provision a cluster (CI=true makes this a failure): {msg}", pytrace=False)
    pytest.skip(f"e2e: no cluster: {msg} (set KUBECONFIG to use an existing cluster)")


@pytest.fixture(scope="session")
def local_cluster(request) -> Iterator[object | None]:
    """The LocalCluster this session started, or None when an existing cluster is used."""
    given = _given_kubeconfig()
    if given:
        if not Path(given.split(os.pathsep)[0]).exists():
            _unavailable(f"kubeconfig {given} does not exist")
        yield None
        return

    try:
        testenv = _load_testenv()
    except Exception as e:
        _unavailable(f"cannot load hack/testenv/cluster.py: {e}")
    binaries = request.config.stash.get(_build_key, None)
    if binaries is None:  # collection hook did not run (e.g. a plugin reordered things): build now
        try:
            binaries = testenv.build_binaries(with_kubelet=True, quiet=True, stream=False)
        except testenv.ClusterError as e:
            binaries = e
    if isinstance(binaries, Exception):
        _unavailable(f"cannot build the control plane binaries: {binaries}")
    if request.config.stash.get(_build_key, None) is None:
        problem = _install_deps(testenv)
        if problem:
            _unavailable(problem)
    images = request.config.stash.get(_images_key, {})
    if not images:
        problem = _build_images(request.config, testenv)
        images = request.config.stash.get(_images_key, {})
        if problem:
            _unavailable(problem)
    os.environ["DOCKER_HOST"] = _docker_host()  # the node imports the images with `docker save`
    cluster = testenv.LocalCluster(binaries=binaries, kubelet_node=True, kubelet_images=list(images.values()))
    cluster.images = images
    try:
        cluster.start()
    except testenv.ClusterError as e:
        request.config.stash.setdefault(_report_key, []).append(
            f"e2e: local cluster failed to start; component logs kept in {cluster.logs}"
        )
        _unavailable(f"the local control plane did not start: {e}")
    rss = cluster.rss_bytes()
    request.config.stash.setdefault(_report_key, []).append(
        f"e2e: local control plane {cluster.server} started in {cluster.timings.get('total', 0):.1f} s, "
        f"RSS {sum(rss.values()) / 2**20:.0f} MiB (" + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in rss.items()) + ")"
    )
    request.config.stash.setdefault(_report_key, []).append(
        "e2e: pods run on the real kubelet node (containerd, CNI, kube-proxy, CoreDNS); trainer pods from "
        f"{images['trainer']}, the operator from {images['operator']}; "
        + ", ".join(f"{k} {v:.1f} s" for k, v in cluster.timings.items() if k.startswith(("import", "kubelet")))
    )
    request.config.stash[_cluster_key] = cluster
    try:
        yield cluster
    finally:
        cluster.stop()
        stray = cluster.stray_pids()
        failed = request.config.stash.get(_failed_key, False)
        if failed or stray:
            request.config.stash.setdefault(_report_key, []).append(
                f"e2e: component logs of the local cluster kept in {cluster.logs}"
            )
        cluster.cleanup(keep_logs=failed or bool(stray))
        assert not stray, f"processes left running after the local cluster stopped: {stray}"


@pytest.fixture(scope="session")
def kubeconfig(local_cluster) -> str:
    """Path of a kubeconfig for the cluster under test (admin rights)."""
    if local_cluster is not None:
        return str(local_cluster.kubeconfig)
    return (os.environ.get("FINETUNE_E2E_KUBECONFIG") or os.environ["KUBECONFIG"]).split(os.pathsep)[0]


@pytest.fixture(scope="session")
def k8s(kubeconfig):
    """A `kubernetes` ApiClient for the cluster under test."""
    kubernetes = pytest.importorskip("kubernetes", reason="the e2e tests use the `kubernetes` client")
    client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    yield client
    client.close()


@pytest.fixture
def namespace(k8s) -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) after the test."""
    from kubernetes import client

    name = f"e2e-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(k8s)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"e2e": "true"})))
    yield name
    try:
        core.delete_namespace(name)
    except client.ApiException as e:
        if e.status != 404:
            raise


@pytest.fixture(scope="session")
def e2e_report(request) -> Callable[[str], None]:
    """`e2e_report(line)`: a line for the end-of-session summary (measurements)."""
    return lambda line: request.config.stash.setdefault(_report_key, []).append(f"e2e: {line}")


@pytest.fixture(scope="session")
def wait_for() -> Callable[..., object]:
    """`wait_for(predicate, timeout=60, what="...")`: poll until truthy, return it, or fail the test."""
    return _wait_for


def _wait_for(predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.2, what: str = ""):
    """Poll `predicate` until it returns something truthy; return that, or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what or predicate} (last: {last!r})")
