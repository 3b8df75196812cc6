"""The trainer's progress push: authenticated, newest-wins, and harmless when the operator is away."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from finetune_trainer.http_report import HttpReporter

pytestmark = pytest.mark.unit


class Recorder(BaseHTTPRequestHandler):
    received: list = []
    status = 200

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, self.headers["Authorization"], json.loads(body)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Recorder.received, Recorder.status = [], 200
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_pushes_carry_the_token_and_epoch_ends_are_sent_at_once(server):
    url = f"http://127.0.0.1:{server.server_port}/v1/progress/ns/job"
    rep = HttpReporter(url, "s3cret", interval=3600)
    rep.event("start", totalEpochs=3, startEpoch=1)
    rep.event("step", epoch=1, totalEpochs=3, step=5, totalSteps=10, trainLoss=0.7, samplesPerSecond=100.0)
    rep.event("epoch", epoch=1, totalEpochs=3, trainLoss=0.5, valLoss=0.6, valAccuracy=0.8,
              bestValAccuracy=0.8, samplesPerSecond=120.0)
    assert wait_for(lambda: any(b["event"] == "epoch" for _, _, b in Recorder.received))
    rep.close()
    path, auth, body = next(r for r in Recorder.received if r[2]["event"] == "epoch")
    assert path == "/v1/progress/ns/job" and auth == "Bearer s3cret"
    assert body["epoch"] == 1 and body["valAccuracy"] == 0.8 and body["totalEpochs"] == 3
    assert isinstance(body["trainLoss"], float)


def test_steps_are_throttled_to_the_interval(server):
    url = f"http://127.0.0.1:{server.server_port}/p"
    rep = HttpReporter(url, "t", interval=3600)
    rep.event("start", totalEpochs=1, startEpoch=1)
    assert wait_for(lambda: len(Recorder.received) == 1)
    for step in range(1, 50):
        rep.event("step", epoch=1, totalEpochs=1, step=step, totalSteps=50, trainLoss=1.0, samplesPerSecond=1.0)
    time.sleep(0.3)
    assert len(Recorder.received) == 1  # no step push before the interval
    rep.close()  # close flushes the newest pending update
    assert Recorder.received[-1][2]["step"] == 49


def test_operator_away_never_blocks_or_raises():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    rep = HttpReporter(f"http://127.0.0.1:{port}/p", "t", interval=0, timeout=0.2, give_up_after=0.5)
    start = time.monotonic()
    for step in range(200):
        rep.event("step", epoch=1, totalEpochs=1, step=step, totalSteps=200, trainLoss=1.0, samplesPerSecond=1.0)
    assert time.monotonic() - start < 0.5  # events are handed off, never sent inline
    rep.close(wait=3)
    assert rep.failed >= 1 and rep.sent == 0


def test_from_environment_needs_url_and_readable_token(tmp_path, monkeypatch):
    monkeypatch.delenv("FINETUNE_PROGRESS_URL", raising=False)
    assert HttpReporter.from_environment() is None
    monkeypatch.setenv("FINETUNE_PROGRESS_URL", "http://127.0.0.1:1/p")
    monkeypatch.setenv("FINETUNE_PROGRESS_TOKEN_FILE", str(tmp_path / "missing"))
    assert HttpReporter.from_environment() is None
    (tmp_path / "token").write_text("abc\n")
    monkeypatch.setenv("FINETUNE_PROGRESS_TOKEN_FILE", str(tmp_path / "token"))
    rep = HttpReporter.from_environment()
    assert rep is not None and rep.token == "abc"
    rep.close(wait=0.1)


def test_a_sigterm_checkpoint_is_pushed_at_once_as_a_step_the_operator_accepts(server):
    """The operator knows four event kinds: the checkpoint note rides on an urgent step push."""
    from finetune_api.progress import parse_event as parse_push

    url = f"http://127.0.0.1:{server.server_port}/v1/progress/ns/job"
    rep = HttpReporter(url, "s3cret", interval=3600)
    rep.event("start", totalEpochs=3, startEpoch=2, resumeCount=1,
              lastCheckpoint={"epoch": 1, "time": "2026-11-23T10:00:00Z", "file": "epoch-0001.pt"})
    note = {"epoch": 2, "step": 7, "time": "2026-11-23T10:01:00Z", "file": "epoch-0002-step-000007.pt"}
    rep.event("checkpoint", epoch=2, totalEpochs=3, step=7, lastCheckpoint=note)
    assert wait_for(lambda: any(b.get("lastCheckpoint") == note for _, _, b in Recorder.received))
    rep.close()
    body = next(b for _, _, b in Recorder.received if b.get("lastCheckpoint") == note)
    assert body["event"] == "step" and body["resumeCount"] == 1
    push = parse_push(json.dumps(body).encode())
    assert push.lastCheckpoint.step == 7 and push.resumeCount == 1


def test_after_a_long_outage_an_epoch_end_is_sent_at_once_not_after_the_backoff(server):
    """The backoff has grown to an hour while the operator was away: an epoch end still goes out when
    the operator is back, instead of after the backoff (which would outlast the run)."""
    Recorder.status = 503  # the operator away (any retryable answer)
    url = f"http://127.0.0.1:{server.server_port}/v1/progress/ns/job"
    rep = HttpReporter(url, "s3cret", interval=3600, max_backoff=3600, give_up_after=7200)
    rep.event("start", totalEpochs=3, startEpoch=1)
    assert wait_for(lambda: rep.failed >= 5, timeout=20)  # the next wait is 16 s
    Recorder.status = 200
    rep.event("epoch", epoch=1, totalEpochs=3, trainLoss=0.5, valLoss=0.6, valAccuracy=0.8,
              bestValAccuracy=0.8, samplesPerSecond=120.0)
    assert wait_for(lambda: any(b["event"] == "epoch" for _, _, b in Recorder.received), timeout=5)
    rep.close(wait=1)
