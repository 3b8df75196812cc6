"""The progress endpoint: right credential accepted, every wrong one rejected with nothing written."""

import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from finetune_api.progress import ProgressEvent as ProgressPush
from finetune_api.progress import parse_event as parse_push
from finetune_operator.metrics import JOB_GAUGES, Metrics
from finetune_operator.progress import (
    JobProgress,
    TokenBucket,
    estimate_eta,
    fraction_done,
    token_digest,
)
from finetune_operator.server import ProgressService, make_app

pytestmark = pytest.mark.unit

TOKENS = {("team-a", "cats"): "tok-cats", ("team-a", "dogs"): "tok-dogs"}
PUSH = {"event": "epoch", "epoch": 2, "totalEpochs": 4, "step": 10, "totalSteps": 10, "trainLoss": 0.5,
        "valLoss": 0.6, "valAccuracy": 0.75, "samplesPerSecond": 120.0}


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
async def env():
    written: list = []
    clock = Clock()

    async def lookup(ns, name):
        token = TOKENS.get((ns, name))
        return token_digest(token) if token else None

    async def write(ns, name, fields):
        written.append((ns, name, fields["progress"]))
        service.fields_written.append(fields)

    service = ProgressService(Metrics(), lookup, write, min_write_interval=5.0, clock=clock)
    service.fields_written = []
    client = TestClient(TestServer(make_app(service)))
    await client.start_server()
    yield client, service, written, clock
    await client.close()


def auth(token):
    return {"Authorization": f"Bearer {token}"}


async def test_right_credential_is_accepted_and_written(env):
    client, _service, written, _ = env
    resp = await client.post("/v1/progress/team-a/cats", json=PUSH, headers=auth("tok-cats"))
    assert resp.status == 204
    (ns, name, progress), = written
    assert (ns, name) == ("team-a", "cats")
    assert progress["epoch"] == 2 and progress["epochText"] == "2/4" and progress["percent"] == 50.0
    assert progress["valAccuracy"] == 0.75 and progress["bestValAccuracy"] == 0.75
    assert isinstance(progress["trainLoss"], float)


@pytest.mark.parametrize(
    ("headers", "path", "status"),
    [
        ({}, "/v1/progress/team-a/cats", 401),
        ({"Authorization": "Basic abc"}, "/v1/progress/team-a/cats", 401),
        (auth("forged"), "/v1/progress/team-a/cats", 403),
        (auth("tok-dogs"), "/v1/progress/team-a/cats", 403),  # another job's valid token
        (auth("tok-cats"), "/v1/progress/team-b/cats", 403),  # same name, other namespace
        (auth("tok-cats"), "/v1/progress/team-a/ghost", 403),  # no such job
    ],
)
async def test_wrong_credentials_are_rejected_and_nothing_is_written(env, headers, path, status):
    client, service, written, _ = env
    resp = await client.post(path, json=PUSH, headers=headers)
    assert resp.status == status
    assert written == [] and service.jobs == {}
    text = service.metrics.exposition().decode()
    assert 'finetune_progress_pushes_total{reason="' in text and 'result="rejected"' in text


async def test_oversized_and_malformed_bodies_are_rejected(env):
    client, _, written, _ = env
    big = {**PUSH, "padding": "x" * 20000}
    assert (await client.post("/v1/progress/team-a/cats", json=big, headers=auth("tok-cats"))).status == 413
    bad = {**PUSH, "valAccuracy": "high"}
    assert (await client.post("/v1/progress/team-a/cats", json=bad, headers=auth("tok-cats"))).status == 400
    nan = json.dumps({**PUSH, "trainLoss": float("nan")})
    resp = await client.post("/v1/progress/team-a/cats", data=nan, headers=auth("tok-cats"))
    assert resp.status == 400
    assert written == []


async def test_rate_limit_per_job(env):
    client, service, _, _ = env
    service.buckets[("team-a", "cats")] = TokenBucket(rate=0.001, burst=2, tokens=2)
    codes = [(await client.post("/v1/progress/team-a/cats", json={**PUSH, "event": "step"},
                                headers=auth("tok-cats"))).status for _ in range(4)]
    assert codes == [204, 204, 429, 429]
    # another job is not affected by cats' limit
    assert (await client.post("/v1/progress/team-a/dogs", json=PUSH, headers=auth("tok-dogs"))).status == 204


async def test_step_writes_are_throttled_and_flushed(env):
    client, service, written, clock = env
    step = {**PUSH, "event": "step", "epoch": 1, "step": 1}
    for i in range(1, 4):
        await client.post("/v1/progress/team-a/cats", json={**step, "step": i}, headers=auth("tok-cats"))
    assert len(written) == 1  # the first write goes through, the next two wait
    clock.now += 6
    await service.flush_pending()
    assert len(written) == 2 and written[-1][2]["step"] == 3


async def test_gauges_match_the_push_and_vanish_when_the_job_is_deleted(env):
    client, service, _, _ = env
    await client.post("/v1/progress/team-a/cats", json=PUSH, headers=auth("tok-cats"))
    text = (await (await client.get("/metrics")).text())
    assert 'finetune_job_val_accuracy{name="cats",namespace="team-a"} 0.75' in text
    assert 'finetune_job_progress_ratio{name="cats",namespace="team-a"} 0.5' in text
    assert 'finetune_job_epoch{name="cats",namespace="team-a"} 2.0' in text
    service.forget("team-a", "cats")
    text = service.metrics.exposition().decode()
    assert 'name="cats"' not in text


def test_eta_comes_from_observed_rate():
    jp = JobProgress()
    t0 = 1000.0
    first = jp.update(ProgressPush(event="epoch", epoch=1, totalEpochs=10), t0)
    assert "etaSeconds" not in first  # one point gives no rate
    later = jp.update(ProgressPush(event="epoch", epoch=3, totalEpochs=10), t0 + 60)
    assert later["etaSeconds"] == pytest.approx(210.0)  # 2 epochs/min, 7 to go
    assert later["etaText"] == "3m30s"
    assert estimate_eta(0, 0.5, 10, 1.0) == 0.0


def test_fraction_done_counts_steps_of_the_current_epoch():
    p = ProgressPush(event="step", epoch=2, totalEpochs=4, step=5, totalSteps=10)
    assert fraction_done(p) == pytest.approx(0.375)


def test_best_accuracy_is_kept_across_worse_epochs():
    jp = JobProgress()
    jp.update(ProgressPush(event="epoch", epoch=1, totalEpochs=3, valAccuracy=0.9), 1.0)
    out = jp.update(ProgressPush(event="epoch", epoch=2, totalEpochs=3, valAccuracy=0.7), 2.0)
    assert out["bestValAccuracy"] == 0.9 and out["valAccuracy"] == 0.7


def test_parse_push_rejects_out_of_range_numbers():
    with pytest.raises(ValueError, match="valAccuracy"):
        parse_push(json.dumps({**PUSH, "valAccuracy": 7}).encode())
    with pytest.raises(ValueError, match="totalEpochs"):
        parse_push(b'{"epoch": 1}')


def test_metric_names_follow_conventions():
    names = Metrics().metric_names()
    for name, _ in JOB_GAUGES.values():
        assert name in names
    assert {"finetune_reconcile_total", "finetune_progress_pushes_total", "finetune_job_duration_seconds_bucket",
            "finetune_job_phase_transitions_total", "finetune_jobs"} <= names


def test_phase_and_stall_series_follow_the_job_and_vanish_on_delete():
    m = Metrics()
    m.observe_phase("ns", "a", "Running")
    m.observe_phase("ns", "a", "Running")  # unchanged: no second transition
    m.observe_stalled("ns", "a", "NoProgress")
    text = m.exposition().decode()
    assert 'finetune_jobs{phase="Running"} 1.0' in text
    assert 'finetune_job_phase_transitions_total{phase="Running",reason=""} 1.0' in text
    assert 'finetune_job_stalled{name="a",namespace="ns",reason="NoProgress"} 1.0' in text
    m.observe_stalled("ns", "a", None)
    assert "finetune_job_stalled{" not in m.exposition().decode()
    m.observe_phase("ns", "a", "Failed", "OOMKilled", duration_seconds=120)
    text = m.exposition().decode()
    assert 'finetune_jobs{phase="Running"} 0.0' in text and 'finetune_jobs{phase="Failed"} 1.0' in text
    assert 'finetune_job_duration_seconds_count{phase="Failed"} 1.0' in text
    m.forget("ns", "a")
    assert 'finetune_jobs{phase="Failed"} 0.0' in m.exposition().decode()


async def test_resume_count_and_checkpoint_go_to_status_at_once_even_between_throttled_steps(env):
    client, service, written, clock = env
    step = {**PUSH, "event": "step", "step": 3, "totalSteps": 10}
    assert (await client.post("/v1/progress/team-a/cats", json=step, headers=auth("tok-cats"))).status == 204
    clock.now += 1  # inside the write interval: a plain step push is held back ...
    assert (await client.post("/v1/progress/team-a/cats", json={**step, "step": 4},
                              headers=auth("tok-cats"))).status == 204
    assert len(written) == 1
    clock.now += 1  # ... but one that reports a new checkpoint (the trainer saving on SIGTERM) is not
    note = {"epoch": 2, "step": 4, "time": "2026-11-23T10:00:00Z", "file": "epoch-0002-step-000004.pt"}
    resp = await client.post("/v1/progress/team-a/cats", json={**step, "step": 4, "resumeCount": 1,
                                                              "lastCheckpoint": note}, headers=auth("tok-cats"))
    assert resp.status == 204 and len(written) == 2
    fields = service.fields_written[-1]
    assert fields["resumeCount"] == 1 and fields["lastCheckpoint"] == note


@pytest.mark.parametrize("bad", [
    {"resumeCount": -1},
    {"lastCheckpoint": {"epoch": 1, "file": "../../etc/passwd"}},
    {"lastCheckpoint": {"epoch": 1, "time": "yesterday"}},
    {"lastCheckpoint": {"step": 3}},
])
async def test_malformed_resume_fields_are_rejected(env, bad):
    client, _service, written, _ = env
    resp = await client.post("/v1/progress/team-a/cats", json={**PUSH, **bad}, headers=auth("tok-cats"))
    assert resp.status == 400 and not written
