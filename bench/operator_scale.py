"""Operator scale: N FineTuneJobs created at once against a real API server.

    .venv/bin/python bench/operator_scale.py [--jobs 500] [--suspend] [--concurrency 16]

Starts the local control plane of hack/testenv (real etcd, kube-apiserver, controller-manager, scheduler;
kwok nodes with room for every pod, so the Job controller's pods are scheduled and "run" without executing
anything), applies the CRD, runs the operator as a local process (`python -m finetune_operator`, the same
code the image runs), then creates N FineTuneJobs from a thread pool and measures, side by side in one run:

  * seconds until every FineTuneJob has its Job (a watch stamps each Job as it appears),
  * per-job latency from the create call returning to its Job appearing (p50/p95/max),
  * seconds until every FineTuneJob has a status phase,
  * the operator's RSS (current and peak) and its reconcile latency percentiles (from its own histogram
    finetune_reconcile_duration_seconds, interpolated within buckets).

Everything it started is stopped at the end (operator, control plane). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from kubernetes import client, config, watch

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "charts" / "finetune-operator" / "crds" / "finetunejobs.finetune.dev.yaml"
GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
MANAGED = "app.kubernetes.io/managed-by=finetune-operator"


def load_testenv():
    spec = importlib.util.spec_from_file_location("finetune_testenv_cluster", REPO / "hack/testenv/cluster.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def apply_crd(api: client.ApiClient) -> None:
    ext = client.ApiextensionsV1Api(api)
    ext.create_custom_resource_definition(yaml.safe_load(CRD.read_text()))
    for _ in range(300):
        conds = ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}").status.conditions or []
        if any(c.type == "Established" and c.status == "True" for c in conds):
            return
        time.sleep(0.1)
    raise RuntimeError("CRD not Established")


def start_operator(kubeconfig: Path, http_port: int, health_port: int, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "MALLOC_ARENA_MAX": "2",  # as the chart's Deployment sets it
        "FINETUNE_TRAINER_IMAGE": "finetune-trainer:bench",
        "FINETUNE_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        "FINETUNE_PROGRESS_URL": f"http://127.0.0.1:{http_port}/",
        "FINETUNE_LIVENESS_ENDPOINT": f"http://127.0.0.1:{health_port}/healthz",
    }
    proc = subprocess.Popen([sys.executable, "-m", "finetune_operator"], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"operator exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=1):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("operator not healthy after 120 s")


def ftj(name: str, suspend: bool) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {"dataset": {"builtin": "digits", "imageSize": 16}, "model": {"weights": {"source": "none"}},
                 "training": {"epochs": 1}, "resources": {"cpu": "10m", "memory": "16Mi"},
                 "runPolicy": {"suspend": suspend}},
    }


class JobStamps(threading.Thread):
    """Monotonic arrival time of every operator-made Job in the namespace, from a watch."""

    def __init__(self, api: client.ApiClient, namespace: str):
        super().__init__(daemon=True)
        self.batch, self.ns, self.seen, self.w = client.BatchV1Api(api), namespace, {}, watch.Watch()
        self.version = self.batch.list_namespaced_job(namespace).metadata.resource_version

    def run(self) -> None:
        while True:
            try:
                for ev in self.w.stream(self.batch.list_namespaced_job, self.ns, label_selector=MANAGED,
                                        resource_version=self.version, timeout_seconds=60):
                    self.version = ev["object"].metadata.resource_version
                    owner = (ev["object"].metadata.owner_references or [None])[0]
                    if owner is not None:
                        self.seen.setdefault(owner.name, time.monotonic())
            except Exception:  # a dropped watch resumes from the last version
                time.sleep(0.2)


def rss_kib(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_process(cluster, operator: subprocess.Popen) -> dict[str, float]:
    pids = {**cluster.pids, "operator": operator.pid}
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, IndexError, ValueError):  # a process already gone
            out[name] = cpu_seconds(pid)
    return out


def histogram_quantiles(text: str, name: str, qs: tuple[float, ...]) -> dict[float, float]:
    """Quantiles of a Prometheus histogram by linear interpolation inside buckets."""
    buckets = sorted((float("inf") if le == "+Inf" else float(le), float(v))
                     for le, v in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M))
    total = buckets[-1][1] if buckets else 0
    out = {}
    for q in qs:
        rank, lower, below = q * total, 0.0, 0.0
        for upper, count in buckets:
            if count >= rank:
                upper = lower * 2 if upper == float("inf") else upper
                out[q] = lower + (upper - lower) * ((rank - below) / max(count - below, 1e-9))
                break
            lower, below = upper, count
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> None:
    testenv = load_testenv()
    binaries = testenv.build_binaries(quiet=True, stream=False)
    nodes = max(1, -(-args.jobs // 100))  # kwok nodes hold 110 pods each
    cluster = testenv.LocalCluster(binaries=binaries, nodes=nodes)
    cluster.start()
    operator = None
    try:
        config.load_kube_config(str(cluster.kubeconfig))
        api = client.ApiClient()
        api.configuration.connection_pool_maxsize = args.concurrency + 4
        apply_crd(api)
        ns = "scale"
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        http_port, health_port = testenv.free_port(), testenv.free_port()
        operator = start_operator(cluster.kubeconfig, http_port, health_port, cluster.logs / "operator.log")
        rss_idle = rss_kib(operator.pid)[0]
        stamps = JobStamps(api, ns)
        stamps.start()
        co = client.CustomObjectsApi(api)
        created: dict[str, float] = {}

        def create(i: int) -> None:
            name = f"job-{i:04d}"
            co.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, ftj(name, args.suspend))
            created[name] = time.monotonic()

        cpu0 = cpu_by_process(cluster, operator)
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(create, range(args.jobs)))
        t_created = time.monotonic() - t0
        while len(stamps.seen) < args.jobs and time.monotonic() - t0 < args.timeout:
            time.sleep(0.2)
        t_jobs = max(stamps.seen.values(), default=t0) - t0
        cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu_by_process(cluster, operator).items()}
        jobs_missing = args.jobs - len(stamps.seen)
        while time.monotonic() - t0 < args.timeout:
            items = co.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
            if all((i.get("status") or {}).get("phase") for i in items):
                break
            time.sleep(0.5)
        t_status = time.monotonic() - t0
        phases: dict[str, int] = {}
        for item in co.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]:
            phase = (item.get("status") or {}).get("phase", "(none)")
            phases[phase] = phases.get(phase, 0) + 1
        time.sleep(args.settle)  # pod events keep arriving; RSS and latencies after the wave
        rss, peak = rss_kib(operator.pid)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
        recon = histogram_quantiles(metrics, "finetune_reconcile_duration_seconds", (0.5, 0.9, 0.99))
        passes = sum(float(v) for v in re.findall(r"^finetune_reconcile_total\{[^}]*\} (\S+)$", metrics, re.M))
        lat = [stamps.seen[n] - created[n] for n in stamps.seen if n in created]
        report(args, nodes, t_created, t_jobs, jobs_missing, t_status, phases, lat, rss_idle, rss, peak, recon,
               passes)
        print("  CPU seconds until every Job existed " + ", ".join(
            f"{k} {v:.0f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])))
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(15)
            except subprocess.TimeoutExpired:
                operator.kill()
        cluster.stop()
        cluster.cleanup()


def report(args, nodes, t_created, t_jobs, missing, t_status, phases, lat, rss_idle, rss, peak, recon, passes):
    mode = "suspended (Kueue-style)" if args.suspend else f"running on {nodes} kwok nodes"
    print(f"\n{args.jobs} FineTuneJobs, Jobs {mode}; {args.concurrency} client threads; {os.cpu_count()} CPU cores")
    print(f"  all {args.jobs} create calls returned     {t_created:7.1f} s")
    print(f"  every FineTuneJob has its Job       {t_jobs:7.1f} s" + (f"  ({missing} MISSING)" if missing else ""))
    if lat:
        print(f"  create -> Job latency               p50 {percentile(lat, .5):.2f} s  p95 {percentile(lat, .95):.2f} s"
              f"  max {max(lat):.2f} s")
    print(f"  every FineTuneJob has a phase       {t_status:7.1f} s   {phases}")
    print(f"  operator RSS                        idle {rss_idle / 1024:.0f} MiB, after {rss / 1024:.0f} MiB, "
          f"peak {peak / 1024:.0f} MiB")
    print("  reconcile duration (histogram)      " + "  ".join(f"p{int(q * 100)} {v * 1000:.0f} ms"
                                                         for q, v in recon.items()) + f"  ({passes:.0f} passes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=16, help="client threads creating FineTuneJobs")
    ap.add_argument("--suspend", action="store_true", help="create the Jobs suspended (no pods)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--settle", type=float, default=10, help="seconds to wait after the wave before sampling")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
