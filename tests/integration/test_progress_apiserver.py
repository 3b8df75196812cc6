"""Progress end to end inside the operator, against a real API server: token Secret → push → status + metrics.

The real operator (every handler, its HTTP server on a free loopback port via `http_listen`) runs against
hack/testenv's control plane (conftest.py). A trainer's part is played by the test: it reads the job's token
from the Secret the operator created (as the trainer reads it from the mounted Secret) and POSTs progress
to /v1/progress/<namespace>/<name>. What the API server adds over a mock: the Secret's token comes back
base64-encoded under `data` (the operator writes `stringData`), progress lands in status through the status
subresource, and a restarted operator, which remembers no token, reads the digest back from that Secret.
"""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from apiserver_util import core_url, ftj_url, job_url, running_operator, wait

from finetune_operator import naming
from finetune_operator.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PROGRESS_URL = "http://operator:8081"  # what the Job's env says; the test posts to the loopback port instead
SPEC = {"dataset": {"builtin": "digits"}, "training": {"epochs": 4}, "runPolicy": {"progressDeadlineSeconds": 3600}}


def manifest(name: str) -> dict[str, Any]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": SPEC}


def status_of(api, ns: str, name: str) -> dict[str, Any]:
    return ((api.get(ftj_url(ns, name)) or {}).get("status")) or {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_on(port: int) -> Settings:
    """The operator's HTTP server on a free loopback port; a short resync, as in test_operator_apiserver."""
    return Settings(trainer_image="trainer:test", resync_seconds=0.3, startup_deadline_seconds=600,
                    http_listen=f"127.0.0.1:{port}", progress_url=PROGRESS_URL)


def http(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def listening(base: str) -> bool:
    try:
        return http("GET", f"{base}/healthz")[0] == 200
    except OSError:  # not listening yet
        return False


def metrics(base: str) -> str:
    status, text = http("GET", f"{base}/metrics")
    assert status == 200, (status, text[:200])
    return text


def token_of(api, ns: str, ftj: dict[str, Any]) -> str:
    """The job's token, as the trainer gets it: from the Secret the operator owns (base64 under `data`)."""
    name = ftj["metadata"]["name"]
    secret = wait(lambda: api.get(core_url(ns, "secrets", naming.token_secret_name(name))), what=f"{name}'s Secret")
    (ref,) = secret["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("FineTuneJob", ftj["metadata"]["uid"], True)
    assert "stringData" not in secret  # the API server stores it as data
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) >= 32, "a per-job token of some length"
    return token


def progress_of(api, ns: str, name: str) -> dict[str, Any]:
    return status_of(api, ns, name).get("progress") or {}


def epoch(n: int, accuracy: float) -> dict[str, Any]:
    return {"event": "epoch", "epoch": n, "totalEpochs": 4, "trainLoss": 1.0 - n / 10, "valLoss": 1.1 - n / 10,
            "valAccuracy": accuracy, "samplesPerSecond": 50.0}


def test_push_with_the_jobs_token_updates_status_and_metrics(apiserver, it_namespace) -> None:
    api, ns = apiserver.api, it_namespace
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running_operator(apiserver.cluster, ns, settings_on(port)):
        ftjs = {name: api.create(ftj_url(ns), manifest(name)) for name in ("cats", "dogs")}
        tokens = {name: token_of(api, ns, ftj) for name, ftj in ftjs.items()}
        assert tokens["cats"] != tokens["dogs"]
        job = wait(lambda: api.get(job_url(ns, naming.job_name("cats"))), what="the Job")
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["FINETUNE_PROGRESS_URL"] == f"{PROGRESS_URL}/v1/progress/{ns}/cats"
        wait(phase_is_pending(api, ns, "cats"), what="cats Pending")
        wait(lambda: listening(base), what=f"the operator's HTTP server on {base}")

        url = f"{base}/v1/progress/{ns}/cats"
        assert http("POST", url, epoch(1, 0.5))[0] == 401  # no credential
        assert http("POST", url, epoch(1, 0.5), token=tokens["dogs"])[0] == 403  # another job's token
        assert http("POST", f"{base}/v1/progress/{ns}/nosuchjob", epoch(1, 0.5), token=tokens["cats"])[0] == 403
        assert "valAccuracy" not in progress_of(api, ns, "cats")  # nothing written for the refused pushes
        status, body = http("POST", url, epoch(1, 0.5), token=tokens["cats"])
        assert status == 204, (status, body)

        progress = wait(lambda: (p := progress_of(api, ns, "cats")).get("valAccuracy") == 0.5 and p,
                        what="status.progress.valAccuracy 0.5")
        assert progress["epochText"] == "1/4" and progress["percent"] == 25.0, progress
        assert progress["epoch"] == 1 and progress["trainLoss"] == pytest.approx(0.9)
        assert "valAccuracy" not in progress_of(api, ns, "dogs")  # the other job is untouched
        fresh = api.get(ftj_url(ns, "cats"))
        assert fresh["metadata"]["generation"] == 1 and fresh["spec"] == ftjs["cats"]["spec"]  # via /status only

        text = metrics(base)
        assert f'finetune_job_val_accuracy{{name="cats",namespace="{ns}"}} 0.5' in text
        assert f'finetune_job_val_accuracy{{name="dogs",namespace="{ns}"}}' not in text
        assert 'finetune_progress_pushes_total{reason="bad_credential",result="rejected"} 2.0' in text
        assert 'finetune_progress_pushes_total{reason="no_credential",result="rejected"} 1.0' in text
        assert 'finetune_progress_pushes_total{reason="",result="accepted"} 1.0' in text
        assert 'finetune_reconcile_total{result="ok"}' in text

        # The other job's own token opens its own path.
        assert http("POST", f"{base}/v1/progress/{ns}/dogs", epoch(1, 0.4), token=tokens["dogs"])[0] == 204
        wait(lambda: progress_of(api, ns, "dogs").get("valAccuracy") == 0.4, what="dogs' status.progress")
        assert progress_of(api, ns, "cats")["valAccuracy"] == 0.5
        wait(lambda: f'finetune_job_val_accuracy{{name="dogs",namespace="{ns}"}} 0.4' in metrics(base),
             what="dogs' series")

        # Deleted (no finalizer; the API server removes it at once): its series go, the other job's stay.
        api.delete(ftj_url(ns, "cats"))
        wait(lambda: api.get(ftj_url(ns, "cats")) is None, timeout=5, what="cats gone")
        wait(lambda: 'name="cats"' not in metrics(base), what="cats' series removed from /metrics")
        assert f'name="dogs",namespace="{ns}"' in metrics(base)
        assert http("POST", url, epoch(2, 0.6), token=tokens["cats"])[0] == 403  # a deleted job's token opens nothing


def phase_is_pending(api, ns: str, name: str):
    return lambda: status_of(api, ns, name).get("phase") == "Pending"


def test_a_restarted_operator_accepts_the_token_from_the_secret(apiserver, it_namespace) -> None:
    """After a restart the operator remembers no token: it reads the Secret back (base64 `data`) to verify."""
    api, ns = apiserver.api, it_namespace
    port = free_port()
    with running_operator(apiserver.cluster, ns, settings_on(port)):
        ftj = api.create(ftj_url(ns), manifest("again"))
        token = token_of(api, ns, ftj)
        wait(phase_is_pending(api, ns, "again"), what="Pending")
    secret_url = core_url(ns, "secrets", naming.token_secret_name("again"))
    secret_uid = api.get(secret_url)["metadata"]["uid"]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running_operator(apiserver.cluster, ns, settings_on(port)) as op:
        wait(lambda: listening(base), what=f"the restarted operator's HTTP server on {base}")
        url = f"{base}/v1/progress/{ns}/again"
        assert http("POST", url, epoch(2, 0.75), token="not-" + token)[0] == 403
        status, body = http("POST", url, epoch(2, 0.75), token=token)
        assert status == 204, (status, body)
        progress = wait(lambda: (p := progress_of(api, ns, "again")).get("valAccuracy") == 0.75 and p,
                        what="status.progress from the restarted operator")
        assert progress["epochText"] == "2/4" and progress["percent"] == 50.0, progress
        assert op.count("GET", f"/secrets/{naming.token_secret_name('again')}") >= 1  # read back
        assert api.get(secret_url)["metadata"]["uid"] == secret_uid  # the same Secret, the same token
        assert token_of(api, ns, ftj) == token
        assert f'finetune_job_val_accuracy{{name="again",namespace="{ns}"}} 0.75' in metrics(base)
