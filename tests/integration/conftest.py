"""Fixtures for the integration tier: the real operator in-process against a real API server.

`apiserver`, `it_namespace`: hack/testenv's local control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler; no node of its own), started once per session and only when such a
test is selected, with the chart's CRDs applied and one node whose kubelet is the test
(apiserver_util.FakeNode). Stopped by PID at the end; a leftover process fails the session. When no
control plane can be provisioned the tests are skipped with the reason, except under CI=true, where that
is a failure (the rule of tests/e2e). Always the local control plane, never KUBECONFIG: these tests
write pod status as the kubelet, which a cluster with real kubelets would fight.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from apiserver_util import Api, FakeNode, GcProbe, apply_crds, e2e_fixtures, load_testenv, wait

_binaries_key = pytest.StashKey[object]()  # {name: Path} from build.sh, or the error it raised
_summary_key = pytest.StashKey[list]()
_failed_key = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _quiet_kopf(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kopf")


# ------------------------------------------------------------------------------------ real API server
def _wants_apiserver(item: pytest.Item) -> bool:
    return "apiserver" in getattr(item, "fixturenames", ())


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build/cache the control plane before the first test (a cold build is ~20 min, outside any timeout)."""
    config = session.config
    if config.option.collectonly or not any(_wants_apiserver(i) for i in session.items):
        return
    try:
        testenv = load_testenv()
    except Exception as err:
        config.stash[_binaries_key] = err
        return
    capman = config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else _null():
        try:
            config.stash[_binaries_key] = testenv.build_binaries(quiet=True, stream=True)
        except testenv.ClusterError as err:
            config.stash[_binaries_key] = err


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: Any) -> None:
        return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any):
    report = yield
    if report.failed and _wants_apiserver(item):
        item.config.stash[_failed_key] = True
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for line in config.stash.get(_summary_key, []):
        terminalreporter.write_line(f"integration: {line}")


def _unavailable(msg: str) -> None:
    if e2e_fixtures()._truthy("CI"):
        pytest.fail(
            f"integration (real API server): could not provision a control plane (CI=true makes this a failure): {msg}",
            pytrace=False,
        )
    pytest.skip(f"integration (real API server): no local control plane: {msg}")


@dataclass
class ApiServer:
    cluster: Any  # hack/testenv LocalCluster
    api: Api
    node: FakeNode
    gc: GcProbe  # .wait_ready(): the garbage collector collects FineTuneJobs' dependents


@pytest.fixture(scope="session")
def apiserver(request: pytest.FixtureRequest) -> Iterator[ApiServer]:
    """A real control plane for this session, the CRDs applied, one test-driven node Ready."""
    try:
        testenv = load_testenv()
    except Exception as err:
        _unavailable(f"cannot load hack/testenv/cluster.py: {err}")
    binaries = request.config.stash.get(_binaries_key, None)
    if binaries is None:  # collection hook skipped (e.g. selected by a plugin later): build now
        try:
            binaries = testenv.build_binaries(quiet=True, stream=False)
        except testenv.ClusterError as err:
            binaries = err
    if isinstance(binaries, Exception):
        _unavailable(f"cannot build the control plane binaries: {binaries}")
    summary = request.config.stash.setdefault(_summary_key, [])
    cluster = testenv.LocalCluster(binaries=binaries)
    try:
        cluster.start()
    except testenv.ClusterError as err:
        summary.append(f"the local control plane failed to start; component logs kept in {cluster.logs}")
        _unavailable(f"the local control plane did not start: {err}")
    pki = cluster.workdir / "pki"
    api = Api(cluster.server, pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
    node = FakeNode(api)
    gc = GcProbe(api)
    t0 = time.monotonic()
    try:
        apply_crds(api)
        gc.start()
        node.start()
        summary.append(
            f"control plane {cluster.server} started in {cluster.timings.get('total', 0):.1f} s, "
            f"CRDs + node Ready in {time.monotonic() - t0:.1f} s"
        )
        yield ApiServer(cluster, api, node, gc)
    finally:
        if gc.seconds is not None:
            summary.append(f"the garbage collector collected FineTuneJob dependents {gc.seconds:.1f} s after the CRDs")
        problems = []
        for helper in (gc, node):  # test-side threads first; the control plane is stopped whatever they do
            try:
                helper.stop()
            except Exception as err:
                problems.append(f"stopping {type(helper).__name__}: {err!r}")
        cluster.stop()
        stray = cluster.stray_pids()
        if request.config.stash.get(_failed_key, False) or stray or problems:
            summary.append(f"component logs of the local control plane kept in {cluster.logs}")
        else:
            cluster.cleanup()
        assert not stray, f"processes left running after the local control plane stopped: {stray}"
        assert not problems, problems
        assert not node.errors, f"the fake kubelet hit errors: {node.errors[:5]}"


@pytest.fixture(scope="session")
def integration_report(request: pytest.FixtureRequest):
    """`integration_report(line)`: a line for the end-of-session summary (measurements, not assertions)."""
    return lambda line: request.config.stash.setdefault(_summary_key, []).append(line)


@pytest.fixture
def it_namespace(apiserver: ApiServer) -> Iterator[str]:
    """A fresh namespace with its default ServiceAccount (pods are refused without it); deleted afterwards."""
    api = apiserver.api
    name = f"it-{uuid.uuid4().hex[:8]}"
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait(lambda: api.get(f"/api/v1/namespaces/{name}/serviceaccounts/default"), what="the default ServiceAccount")
    yield name
    api.delete(f"/api/v1/namespaces/{name}")
