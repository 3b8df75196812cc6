"""Progress end to end inside the operator: per-job token Secret → push → status.progress + metrics.

Runs the real operator (all handlers, the HTTP server on a free loopback port) against kmock;
the mock's limits are listed in test_operator_kmock.py.
"""

from __future__ import annotations

import dataclasses
import socket

import aiohttp
import pytest
from kmock_cluster import FTJ, NS, SECRETS, TEST_SETTINGS, Cluster, eventually, running_operator

from finetune_operator import naming
from finetune_operator.kube import ftj_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest(name: str) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name, "namespace": NS},
            "spec": {"dataset": {"builtin": "digits"}, "training": {"epochs": 4},
                     "runPolicy": {"progressDeadlineSeconds": 3600}}}


async def test_push_with_the_jobs_token_updates_status_and_metrics(cluster: Cluster) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = dataclasses.replace(TEST_SETTINGS, http_listen=f"127.0.0.1:{port}", progress_url="http://operator:8081")
    async with running_operator(cluster, settings):
        for name in ("cats", "dogs"):
            await cluster.create(ftj_path(NS), manifest(name))
        secrets = {}
        for name in ("cats", "dogs"):
            ftj = await eventually(lambda n=name: cluster.get(FTJ, n), what=name)
            secret = await eventually(lambda n=name: cluster.get(SECRETS, naming.token_secret_name(n)),
                                      what="the token Secret")
            assert secret["metadata"]["ownerReferences"][0]["uid"] == ftj["metadata"]["uid"]
            secrets[name] = secret["stringData"]["token"]
        job = await eventually(lambda: cluster.get("batch/v1/jobs", "cats"), what="the Job")
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["FINETUNE_PROGRESS_URL"] == f"http://operator:8081/v1/progress/{NS}/cats"

        push = {"event": "epoch", "epoch": 1, "totalEpochs": 4, "trainLoss": 0.9, "valLoss": 1.0,
                "valAccuracy": 0.5, "samplesPerSecond": 50.0}
        url = f"{base}/v1/progress/{NS}/cats"
        async with aiohttp.ClientSession() as http:
            wrong = await http.post(url, json=push, headers={"Authorization": f"Bearer {secrets['dogs']}"})
            assert wrong.status == 403
            ok = await http.post(url, json=push, headers={"Authorization": f"Bearer {secrets['cats']}"})
            assert ok.status == 204
            progress = await eventually(
                lambda: ((cluster.get(FTJ, "cats").get("status") or {}).get("progress") or {}).get("valAccuracy"),
                what="status.progress")
            assert progress == 0.5
            status = cluster.get(FTJ, "cats")["status"]
            assert status["progress"]["epochText"] == "1/4" and status["progress"]["percent"] == 25.0
            assert "valAccuracy" not in ((cluster.get(FTJ, "dogs").get("status") or {}).get("progress") or {})
            metrics = await (await http.get(f"{base}/metrics")).text()
            assert f'finetune_job_val_accuracy{{name="cats",namespace="{NS}"}} 0.5' in metrics
            assert 'finetune_progress_pushes_total{reason="bad_credential",result="rejected"} 1.0' in metrics
            assert 'finetune_reconcile_total{result="ok"}' in metrics

            await cluster.delete(ftj_path(NS, "cats"))
            gone = await eventually(
                lambda: 'name="cats"' not in _text(cluster, port) and "gone", what="cats' series removed")
            assert gone == "gone"


def _text(cluster: Cluster, port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()
