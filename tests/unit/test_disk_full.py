"""A full disk while writing a checkpoint, the feature cache or the export: the last good checkpoint and any
earlier export stay as they were, no temp file is left, the run ends `DiskFull` with exit 1, and a retry once
the volume has room resumes. Tested on a real 4 MiB tmpfs filled at the moment of the write, and by injecting
ENOSPC where a real disk is hard to fill at the right byte; the operator names the reason from the trainer's
termination message.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hostile_util import make_runs
from trainer_util import write_job

from finetune_api.errors import EXIT_OK, EXIT_RUNTIME_ERROR
from finetune_api.status import Reason
from finetune_operator import observe
from finetune_trainer import checkpoint as ckpt
from finetune_trainer import export, feature_store, finish, safe_io
from finetune_trainer.cli import main

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    return make_runs(tmp_path_factory.mktemp("made"))


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of its own (filling it fills nothing else); grow(volume, size) gives it more room."""
    where = tmp_path / "vol"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def grow(where: Path, size: str) -> None:
    """What resizing a PersistentVolume does to the trainer's volume, with the files on it kept."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def fill(folder: Path) -> Path:
    """Write a filler file until the volume refuses another byte."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
        except OSError as err:
            assert err.errno == errno.ENOSPC
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass
    assert safe_io.out_of_space(folder)
    return filler


def filling_before(monkeypatch, module, name: str, folder: Path) -> None:
    """`module.name` fills the volume, then does its real work: the disk is full exactly at that write."""
    real = getattr(module, name)

    def full_then_real(*a, **k):
        if not (folder / "filler").exists():
            fill(folder)
        return real(*a, **k)

    monkeypatch.setattr(module, name, full_then_real)


def job_in(tmp_path: Path, made: dict, out: Path) -> Path:
    spec = {**made["spec"], "output": {**made["spec"]["output"], "path": str(out)}}
    return write_job(tmp_path / "job.yaml", spec)


def run(argv: list, capsys) -> tuple[int, list[str], str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [ln for ln in err.splitlines() if ln.startswith("error:")], err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".staged"))]


@pytest.fixture
def termination(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(path))
    return path


def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one_and_the_retry_resumes(
        made, volume, tmp_path, capsys, monkeypatch, termination) -> None:
    out = volume / "out"
    shutil.copytree(made["midrun"], out)
    kept = snapshot(out / "checkpoints")
    with monkeypatch.context() as m:
        filling_before(m, ckpt, "save_checkpoint", volume)
        code, errors, err = run(["-f", job_in(tmp_path, made, out), "--epochs", 3], capsys)
    assert code == EXIT_RUNTIME_ERROR and len(errors) == 1, err
    assert "output.path: " in errors[0] and "epoch-0003.pt: No space left on device" in errors[0]
    assert termination.read_text().startswith("DiskFull: output.path: ")
    assert snapshot(out / "checkpoints") == kept and not leftovers(volume) and not (out / "model.json").exists()
    (volume / "filler").unlink()
    grow(volume, "128m")  # room for the export too (the whole resnet18)
    code, errors, err = run(["-f", job_in(tmp_path, made, out), "--epochs", 3], capsys)
    assert code == EXIT_OK and "resuming from epoch-0002.pt" in err, err
    assert (out / "model.json").is_file() and (out / "checkpoints" / "epoch-0003.pt").is_file()


def test_a_full_disk_at_the_export_keeps_the_earlier_export_intact(
        made, volume, tmp_path, capsys, monkeypatch, termination) -> None:
    grow(volume, "96m")  # the earlier export (the whole resnet18) and its checkpoints fit, a second copy not
    out = volume / "out"
    shutil.copytree(made["export"], out)
    earlier = {n: b for n, b in snapshot(out).items() if n in ("model.json", "model.safetensors")}
    with monkeypatch.context() as m:
        filling_before(m, finish, "write_export", volume)
        code, errors, err = run(["-f", job_in(tmp_path, made, out), "--epochs", 3], capsys)
    assert code == EXIT_RUNTIME_ERROR and len(errors) == 1 and "No space left on device" in errors[0], err
    assert termination.read_text().startswith("DiskFull: ")
    assert {n: b for n, b in snapshot(out).items() if n in earlier} == earlier, "the earlier export changed"
    assert ckpt.load_checkpoint(out / "checkpoints" / "epoch-0003.pt")["epoch"] == 3  # the last good checkpoint
    assert not leftovers(volume)
    (volume / "filler").unlink()
    grow(volume, "160m")
    code, errors, err = run(["-f", job_in(tmp_path, made, out), "--epochs", 3], capsys)
    assert code == EXIT_OK, err
    assert export.read_export(out)["epochs"] == 3


def test_a_full_disk_at_the_feature_cache_frees_it_and_ends_diskfull_at_the_checkpoint(
        made, volume, tmp_path, capsys, monkeypatch, termination) -> None:
    """The cache is optional (its failure is a warning), but on a disk that stays full the checkpoint after
    the epoch cannot be written either: DiskFull, with the cache's temp file freed and checkpoint 2 kept."""
    out = volume / "out"
    shutil.copytree(made["midrun"], out)
    shutil.rmtree(out / "cache")
    kept = snapshot(out / "checkpoints")
    with monkeypatch.context() as m:
        filling_before(m, feature_store, "save", volume)
        code, errors, err = run(["-f", job_in(tmp_path, made, out), "--epochs", 3], capsys)
    assert code == EXIT_RUNTIME_ERROR and len(errors) == 1 and "No space left on device" in errors[0], err
    assert termination.read_text().startswith("DiskFull: ")
    assert snapshot(out / "checkpoints") == kept and not leftovers(volume)
    assert not list((out / "cache").glob("features-*.pt")), "a half-written cache file was kept"


def test_no_room_for_the_cache_alone_costs_only_the_cache(made, tmp_path, capsys, monkeypatch, caplog) -> None:
    out = tmp_path / "out"
    shutil.copytree(made["midrun"], out)
    shutil.rmtree(out / "cache")
    real = torch.save

    def no_room_for_features(obj, f, *a, **k):
        if "features-" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", no_room_for_features)
    code, errors, err = run(["-f", job_in(tmp_path, made, out), "--epochs", 3], capsys)
    assert code == EXIT_OK and not errors, err
    assert any("feature cache not saved" in r.getMessage() for r in caplog.records)
    assert (out / "model.json").is_file() and not leftovers(out)


@pytest.mark.parametrize("raised", ["OSError", "RuntimeError"])
def test_enospc_injected_at_a_checkpoint_ends_diskfull(made, tmp_path, capsys, monkeypatch, termination,
                                                       raised) -> None:
    """OSError: what Python's own writes give. RuntimeError: what torch.save gives on a full disk (a stream
    position mismatch, no errno), recognised by the free space left."""
    out = tmp_path / "out"
    shutil.copytree(made["midrun"], out)
    kept = snapshot(out / "checkpoints")
    real = torch.save

    def full(obj, f, *a, **k):
        if ".epoch-" not in str(f):
            return real(obj, f, *a, **k)
        Path(f).write_bytes(b"PK\x03\x04 half")  # what a writer leaves before it fails
        if raised == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(safe_io, "out_of_space", lambda folder: True)
    code, errors, err = run(["-f", job_in(tmp_path, made, out), "--epochs", 3], capsys)
    assert code == EXIT_RUNTIME_ERROR and len(errors) == 1 and "epoch-0003.pt: No space left" in errors[0], err
    assert termination.read_text().startswith("DiskFull: output.path: ")
    assert snapshot(out / "checkpoints") == kept and not leftovers(out)


def test_a_serializer_failure_with_room_left_is_not_called_a_full_disk(tmp_path) -> None:
    def broken(tmp: str) -> None:
        raise RuntimeError("some bug")

    with pytest.raises(RuntimeError, match="some bug"):
        safe_io.atomic_write(tmp_path / "x.pt", broken)
    assert not list(tmp_path.iterdir())


def test_enospc_at_model_json_keeps_the_earlier_export_and_frees_the_staged_weights(
        made, tmp_path, capsys, monkeypatch, termination) -> None:
    out = tmp_path / "out"
    shutil.copytree(made["export"], out)
    earlier = {n: b for n, b in snapshot(out).items() if n in ("model.json", "model.safetensors")}
    real = export.atomic_write

    def no_room_for_model_json(path, write):
        if Path(path).name == ".model.json.staged":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, write)

    monkeypatch.setattr(export, "atomic_write", no_room_for_model_json)
    code, errors, err = run(["-f", job_in(tmp_path, made, out), "--epochs", 3], capsys)
    assert code == EXIT_RUNTIME_ERROR and len(errors) == 1, err
    assert termination.read_text().startswith("DiskFull: ")
    assert {n: b for n, b in snapshot(out).items() if n in earlier} == earlier and not leftovers(out)


def test_a_full_volume_exits_1_in_a_real_process(made, volume, tmp_path) -> None:
    out = volume / "out"
    shutil.copytree(made["midrun"], out)
    kept = snapshot(out / "checkpoints")
    fill(volume)
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer", "-f", str(job_in(tmp_path, made, out)),
                           "--epochs", "3"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == EXIT_RUNTIME_ERROR, proc.stderr
    assert "Traceback" not in proc.stderr and len([ln for ln in proc.stderr.splitlines()
                                                   if ln.startswith("error:")]) == 1, proc.stderr
    assert (tmp_path / "termination-log").read_text().startswith("DiskFull: ")
    assert snapshot(out / "checkpoints") == kept and not leftovers(volume)


def _failed_pod(message: str) -> dict:
    term = {"exitCode": 1, "reason": "Error", "message": message}
    return {"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": term}}]}}


def test_the_operator_names_diskfull_from_the_termination_message() -> None:
    line = "output.path: /output/checkpoints/epoch-0003.pt: No space left on device — …"
    pod = _failed_pod(f"DiskFull: {line}")
    assert observe.pod_failure(pod) == (Reason.DISK_FULL, line)
    job = {"metadata": {}, "status": {"failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "x"}]}}
    reason, message = observe.job_failure(job, [pod])
    assert reason == "DiskFull" and message.endswith(line)
    assert observe.pod_failure(_failed_pod("TrainingError: boom"))[0] == Reason.TRAINER_ERROR
