"""Data-parallel training: two local worker processes started exactly as the operator's pods start them.

Each "pod" is `finetune-train torchrun …` with the arguments build_job() gives the container — only the
completion index, worker 0's address (127.0.0.1) and the port are filled in, as the kubelet and cluster
DNS would — reading the job file build_configmap() produces. Gloo on CPU, digits at 16 px.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainer_util import tiny_spec

from finetune_api.errors import EXIT_INVALID_JOB, EXIT_OK, EXIT_PREEMPTED, JobFileError
from finetune_api.spec import parse_spec
from finetune_operator import objects
from finetune_operator.parsed import FineTuneJob
from finetune_operator.settings import Settings
from finetune_trainer.data import build_dataloaders, load_splits
from finetune_trainer.distributed import Dist
from finetune_trainer.engine import Compute, Precision, evaluate
from finetune_trainer.fit import fit
from finetune_trainer.launch import exit_code
from finetune_trainer.model import build_model
from finetune_trainer.predict import Predictor
from finetune_trainer.report import Reporter

pytestmark = pytest.mark.unit

WAIT = 120  # seconds: a bound on "does not hang", far above the few seconds these runs take
TRAINER = Path(sys.executable).with_name("finetune-train")


def job_spec(output: Path, **training: Any) -> dict[str, Any]:
    return {
        "model": {"architecture": "resnet18", "weights": {"source": "none"}},
        "dataset": {"builtin": "digits", "imageSize": 16, "maxImagesPerClass": 30},
        # fp32: the comparison with one process is about the data split, not about bf16 rounding
        "training": {"epochs": 3, "batchSize": 32, "learningRate": 0.01, "device": "cpu", "precision": "fp32",
                     "logEverySteps": 1, **training},
        "output": {"path": str(output)},
        "workers": 2,
    }


def manifest(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "dp", "namespace": "ml", "uid": "uid-dp"}, "spec": spec}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Group:
    """The worker pods of one attempt, as local process groups (killing one kills its whole "pod")."""

    def __init__(self, tmp: Path, spec: dict[str, Any], attempt: str = "a", timeout: int = 60):
        body = manifest(spec)
        job_file = tmp / "job.yaml"
        ftj = FineTuneJob.from_body(body)
        job_file.write_text(objects.build_configmap(ftj)["data"]["job.yaml"])
        (container,) = objects.build_job(ftj, Settings())["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["finetune-train"]
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FINETUNE_COLLECTIVE_TIMEOUT_SECONDS": str(timeout)}
        self.procs: list[subprocess.Popen] = []
        self.logs = [tmp / f"{attempt}-worker-{i}" for i in range(spec["workers"])]
        for index, log in enumerate(self.logs):
            args = [self._pod_arg(a, index, port, job_file) for a in container["args"]]
            self.procs.append(subprocess.Popen(
                [str(TRAINER), *args], env=env, start_new_session=True, text=True,
                stdout=subprocess.PIPE if index == 0 else open(f"{log}.out", "w"),  # noqa: SIM115
                stderr=open(f"{log}.err", "w"),  # noqa: SIM115
            ))

    @staticmethod
    def _pod_arg(arg: str, index: int, port: int, job_file: Path) -> str:
        """What the kubelet and the cluster DNS make of the container's args for pod `index`."""
        if arg.startswith("--master-addr="):
            return "--master-addr=127.0.0.1"
        if arg.startswith("--master-port="):
            return f"--master-port={port}"
        return arg.replace("$(JOB_COMPLETION_INDEX)", str(index)).replace(objects.JOB_FILE, str(job_file))

    def events(self):
        """Rank 0's JSON lines, as they come."""
        for line in self.procs[0].stdout:
            if line.startswith("{"):
                yield json.loads(line)

    def wait(self) -> list[int]:
        deadline = time.monotonic() + WAIT
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]

    def stderr(self, index: int) -> str:
        return Path(f"{self.logs[index]}.err").read_text()[-3000:]

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        """SIGKILL: the pod dies, every process in it (torchrun starts its worker in a session of its
        own, so the tree is walked). SIGTERM: the kubelet stops the pod (its PID 1, torchrun, only)."""
        if sig != signal.SIGKILL:
            self.procs[index].send_signal(sig)
            return
        for pid in [self.procs[index].pid, *descendants(self.procs[index].pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def close(self) -> None:
        for index, p in enumerate(self.procs):
            if p.poll() is None:
                self.kill(index)
                p.wait()


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


@pytest.fixture
def groups():
    started: list[Group] = []
    yield lambda *a, **kw: started.append(Group(*a, **kw)) or started[-1]
    for g in started:
        g.close()


# ------------------------------------------------------------------ in-process: the split itself


def test_each_rank_takes_half_of_every_global_batch_and_the_steps_stay_the_same(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, **{"dataset.maxImagesPerClass": 35})  # 105 train images: a ragged last batch
    splits = load_splits(spec.dataset, 0)
    prep = build_model(spec, 3).preprocessing
    one, _ = build_dataloaders(splits, prep, spec.dataset, 32)
    ranks = [build_dataloaders(splits, prep, spec.dataset, 16, num_replicas=2, rank=r)[0] for r in (0, 1)]
    for loader in (one, *ranks):
        loader.sampler.reseed(7)
    single = list(one.batch_sampler)
    per_rank = [list(loader.batch_sampler) for loader in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(single) == 4
    for step, batch in enumerate(single):
        shares = [set(p[step]) for p in per_rank]
        assert len(per_rank[0][step]) == len(per_rank[1][step]) <= 16
        assert shares[0] | shares[1] >= set(batch), f"step {step}: the ranks' shares are the global batch"
        assert len(shares[0] | shares[1]) <= len(batch) + 1  # the last step pads one image, as DistributedSampler


def test_val_is_sharded_without_padding(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    splits = load_splits(spec.dataset, 0)
    prep = build_model(spec, 3).preprocessing
    shards = [list(build_dataloaders(splits, prep, spec.dataset, 8, num_replicas=3, rank=r)[1].sampler)
              for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(len(splits.val)))


def test_the_global_batch_must_split_evenly_and_the_environment_is_checked() -> None:
    assert Dist(4, 1).per_rank_batch(32) == 8
    with pytest.raises(JobFileError, match="global batch and must be a multiple of the 3 training processes"):
        Dist(3, 0).per_rank_batch(32)
    assert Dist.from_environment({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0"}) == Dist(2, 1, 0)
    assert Dist.from_environment({}) == Dist()
    with pytest.raises(JobFileError, match="RANK 2 outside WORLD_SIZE 2"):
        Dist.from_environment({"WORLD_SIZE": "2", "RANK": "2"})


def test_a_killed_worker_reports_128_plus_the_signal() -> None:
    assert (exit_code(-9), exit_code(-15), exit_code(2), exit_code(75)) == (137, 143, 2, 75)


# ------------------------------------------------------------------ two worker processes


@pytest.mark.slow
def test_two_workers_train_like_one_with_the_global_batch_split(tmp_path: Path, groups) -> None:
    spec = job_spec(tmp_path / "out2")
    one_out = tmp_path / "out1"
    events: list[tuple[str, dict]] = []

    class Recorder(Reporter):
        def event(self, kind: str, **f: Any) -> None:
            events.append((kind, f))

    single = fit(parse_spec(job_spec(one_out)), Recorder(), one_out)  # one process: spec.workers is for pods
    group = groups(tmp_path, spec)
    seen = list(group.events())
    assert group.wait() == [EXIT_OK, EXIT_OK], group.stderr(0) + group.stderr(1)

    start = next(e for e in seen if e["event"] == "start")
    assert (start["workers"], start["batchPerWorker"]) == (2, 16)
    steps = {e["totalSteps"] for e in seen if e["event"] == "step"}
    assert steps == {next(f["totalSteps"] for k, f in events if k == "step")}, "same steps per epoch as 1 worker"
    meta = json.loads((tmp_path / "out2" / "model.json").read_text())
    assert meta["distributed"] == {"workers": 2, "batchPerWorker": 16}
    assert abs(meta["metrics"]["valAccuracy"] - single.val_accuracy) <= 0.01, (meta["metrics"], single)
    two = [e for e in seen if e["event"] == "epoch"]
    assert [e["trainLoss"] for e in two] == pytest.approx([h["trainLoss"] for h in single.history], rel=1e-3)
    assert Path(f"{group.logs[1]}.out").read_text() == "", "rank 1 prints no progress"
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == [
        "checkpoints", "confusion_matrix.png", "evaluation.json", "model.json", "model.safetensors",
        "training_curves.png"]  # rank 0's export and report only


@pytest.mark.slow
def test_a_killed_worker_stops_the_group_and_the_rerun_resumes_from_rank_0s_checkpoint(tmp_path: Path,
                                                                                      groups) -> None:
    spec = job_spec(tmp_path / "out", epochs=4, featureCache="off")
    group = groups(tmp_path, spec)
    for event in group.events():
        if event["event"] == "epoch":  # epoch 1 checkpointed by rank 0: now lose worker 1's "pod"
            group.kill(1)
            break
    started = time.monotonic()
    codes = group.wait()  # a hang would time out here
    assert codes[1] == -signal.SIGKILL and codes[0] not in (EXIT_OK, EXIT_PREEMPTED), group.stderr(0)
    assert time.monotonic() - started < WAIT
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["epoch-0001.pt"]

    again = groups(tmp_path, spec, attempt="b")  # the Job's retry of the whole group
    start = next(e for e in again.events() if e["event"] == "start")
    assert again.wait() == [EXIT_OK, EXIT_OK], again.stderr(0) + again.stderr(1)
    assert (start["resumeCount"], start["startEpoch"]) == (1, 2)
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["resumedFromEpoch"] == 1 and len(meta["history"]) == 4


@pytest.mark.slow
def test_a_hung_worker_makes_the_others_fail_after_the_collective_timeout(tmp_path: Path, groups) -> None:
    """A worker that stops answering (here: SIGSTOP) is not waited for forever: its peers' next collective
    times out (FINETUNE_COLLECTIVE_TIMEOUT_SECONDS) and they exit, so their pods fail and the Job acts."""
    group = groups(tmp_path, job_spec(tmp_path / "out", epochs=4, featureCache="off"), timeout=10)
    for event in group.events():
        if event["event"] == "step":
            (worker,) = [pid for pid in descendants(group.procs[1].pid)
                         if b"finetune_trainer" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            os.kill(worker, signal.SIGSTOP)  # the training process of worker 1; its torchrun agent lives on
            break
    code = group.procs[0].wait(timeout=WAIT)
    assert code not in (EXIT_OK, EXIT_PREEMPTED)
    assert "Timed out" in group.stderr(0) or "timed out" in group.stderr(0), group.stderr(0)


@pytest.mark.slow
def test_sigterm_to_one_pod_stops_every_worker_at_the_same_step_with_a_checkpoint(tmp_path: Path,
                                                                                 groups) -> None:
    """A preempted pod: torchrun forwards SIGTERM to its worker, the stop flag is all-reduced, so both
    workers leave after the same step; rank 0 saves the mid-epoch checkpoint and both pods exit 75."""
    spec = job_spec(tmp_path / "out", epochs=2, featureCache="off", batchSize=8)
    group = groups(tmp_path, spec)
    for event in group.events():
        if event["event"] == "step" and event["epoch"] == 2 and event["step"] == 2:
            group.kill(1, signal.SIGTERM)  # to the "pod" of worker 1: its torchrun agent
            break
    assert group.wait() == [EXIT_PREEMPTED, EXIT_PREEMPTED], group.stderr(0) + group.stderr(1)
    (saved,) = [p.name for p in (tmp_path / "out" / "checkpoints").iterdir() if "-step-" in p.name]
    assert saved.startswith("epoch-0002-step-")
    again = groups(tmp_path, spec, attempt="b")
    start = next(e for e in again.events() if e["event"] == "start")
    assert again.wait() == [EXIT_OK, EXIT_OK], again.stderr(0) + again.stderr(1)
    assert start["resumeCount"] == 1 and start["lastCheckpoint"]["file"] == saved


def test_an_invalid_job_file_exits_2_through_torchrun(tmp_path: Path) -> None:
    """The launcher keeps the trainer's exit code, so podFailurePolicy still fails the Job at once."""
    bad = tmp_path / "job.yaml"
    bad.write_text(yaml.safe_dump({"spec": {"dataset": {"builtin": "digits"}, "training": {"epochs": 0}}}))
    proc = subprocess.run(
        [str(TRAINER), "torchrun", "--nnodes=1", "--nproc-per-node=1", "--master-addr=127.0.0.1",
         f"--master-port={free_port()}", "--max-restarts=0", "-m", "finetune_trainer", "-f", str(bad)],
        capture_output=True, text=True, timeout=WAIT,
    )
    assert proc.returncode == EXIT_INVALID_JOB, proc.stderr[-2000:]
    assert "spec.training.epochs" in proc.stderr


@pytest.mark.slow
def test_a_timm_model_trains_with_two_workers_like_one(tmp_path: Path, groups) -> None:
    """A timm model through the same torchrun path (head only: with a trained BatchNorm each rank would
    normalise its half of the batch, and the comparison would be about that, not about timm)."""
    timm_model = {"library": "timm", "architecture": "test_efficientnet", "weights": {"source": "none"}}
    spec = {**job_spec(tmp_path / "out2", epochs=2), "model": timm_model}
    single_spec = {**spec, "output": {"path": str(tmp_path / "out1")}}
    single = fit(parse_spec(single_spec), Reporter(), tmp_path / "out1")
    group = groups(tmp_path, spec)
    list(group.events())
    assert group.wait() == [EXIT_OK, EXIT_OK], group.stderr(0) + group.stderr(1)
    meta = json.loads((tmp_path / "out2" / "model.json").read_text())
    assert meta["library"] == "timm" and meta["distributed"]["workers"] == 2
    assert [h["trainLoss"] for h in meta["history"]] == pytest.approx(
        [h["trainLoss"] for h in single.history], rel=1e-3)


@pytest.mark.slow
def test_gradual_unfreezing_rewraps_ddp_when_a_stage_unfreezes(tmp_path: Path, groups) -> None:
    """freeze.schedule under torchrun: DistributedDataParallel is rebuilt over the new trainable set (a
    stage DDP did not register would train unsynchronised, one it registered without gradients would hang
    or fail the reduction), and the frozen stages stay as initialised."""
    schedule = {"policy": "head", "schedule": [{"epoch": 2, "trainableStages": 1}]}
    spec = {**job_spec(tmp_path / "out2", epochs=2), "freeze": schedule}
    untrained = {**spec, "output": {"path": str(tmp_path / "out1")}, "workers": 1, "freeze": {"policy": "head"}}
    fit(parse_spec(untrained), Reporter(), tmp_path / "out1")  # the same initial weights; only fc trains
    group = groups(tmp_path, spec)
    seen = list(group.events())
    assert group.wait() == [EXIT_OK, EXIT_OK], group.stderr(0) + group.stderr(1)
    texts = [e["text"] for e in seen if e["event"] == "message" and "freeze.schedule" in e["text"]]
    assert texts == ["freeze.schedule, epoch 1: backbone frozen, training fc",
                     "freeze.schedule, epoch 2: training layer4 and fc"]
    two, one = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("out2", "out1"))
    assert all(torch.equal(two[k], one[k]) for k in two if k.startswith("layer3."))  # frozen throughout
    assert any(not torch.equal(two[k], one[k]) for k in two if k.startswith("layer4."))  # trained from epoch 2
    # Each rank evaluated its val shard with its own weights: only if DDP kept layer4 in sync do rank 0's
    # weights alone, on the whole val set, give the loss the group recorded for the last epoch.
    meta = json.loads((tmp_path / "out2" / "model.json").read_text())
    assert meta["bestEpoch"] == 2, "the export is epoch 2's weights"
    parsed = parse_spec(spec)
    splits = load_splits(parsed.dataset, 0)
    _, val = build_dataloaders(splits, build_model(parsed, len(splits.classes)).preprocessing, parsed.dataset, 32)
    cpu = Compute(torch.device("cpu"), Precision("fp32", None, "cpu"))
    ev = evaluate(Predictor.load(tmp_path / "out2").model, val, torch.nn.CrossEntropyLoss(), cpu, len(splits.classes))
    assert ev.loss == pytest.approx(meta["history"][-1]["valLoss"], rel=1e-4)
