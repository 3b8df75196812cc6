"""The CLI contract: exit codes, one-line errors, nothing half-written on bad input."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torchvision import models as tvm
from trainer_util import make_image_folder, write_job

from finetune_api.errors import EXIT_INVALID_JOB, EXIT_OK
from finetune_trainer.cli import main

pytestmark = pytest.mark.unit

TINY = {"training": {"epochs": 1, "batchSize": 16, "device": "cpu"}, "dataset": {"imageSize": 16}}


def job(tmp_path, **spec):
    base = {"model": {"weights": {"source": "none"}}, **TINY}
    merged = {**base, **spec, "dataset": {**TINY["dataset"], **spec.get("dataset", {})},
              "output": {"path": str(tmp_path / "out")}}
    return write_job(tmp_path / "job.yaml", merged)


def run(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


BAD_CASES = {
    "unknown architecture": ({"model": {"architecture": "resnet9"}, "dataset": {"builtin": "digits"}},
                             "spec.model.architecture"),
    "unknown field": ({"dataset": {"builtin": "digits"}, "trainig": {}}, "spec.trainig: Extra inputs"),
    "negative epochs": ({"dataset": {"builtin": "digits"}, "training": {"epochs": -2}},
                        "spec.training.epochs: Input should be greater than or equal to 1"),
    "missing dataset path": ({"dataset": {"path": "/nonexistent/images"}},
                             "dataset.path: /nonexistent/images does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_job_files_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, case):
    spec, message = BAD_CASES[case]
    path = write_job(tmp_path / "job.yaml", {**spec, "output": {"path": str(tmp_path / "out")}})
    code, err = run(["-f", path], capsys)
    assert code == EXIT_INVALID_JOB
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_empty_class_is_a_clear_config_error(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imgs", {"cat": 4, "dog": 4})
    (root / "empty").mkdir()
    code, err = run(["-f", job(tmp_path, dataset={"path": str(root)})], capsys)
    assert code == EXIT_INVALID_JOB and "class 'empty' has no readable images" in err
    assert not (tmp_path / "out").exists()


def test_weights_with_wrong_shapes_exit_2(tmp_path, capsys):
    state = tvm.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "w.pt")
    weights = {"source": "file", "path": str(tmp_path / "w.pt")}
    code, err = run(["-f", job(tmp_path, model={"weights": weights}, dataset={"builtin": "digits"})], capsys)
    assert code == EXIT_INVALID_JOB
    assert "1 shape mismatch(es): conv1.weight: file (64, 3, 3, 3) vs model (64, 3, 7, 7)" in err
    assert not (tmp_path / "out").exists()


def test_unreadable_image_is_skipped_and_counted(tmp_path, capsys, caplog):
    root = make_image_folder(tmp_path / "imgs", {"cat": 6, "dog": 6})
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, err = run(["-f", job(tmp_path, dataset={"path": str(root)})], capsys)
    assert code == EXIT_OK, err
    assert "skipping unreadable image" in caplog.text and "broken.png" in caplog.text
    assert "1 unreadable image(s) skipped" in err
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["dataset"]["skippedImages"] == 1 and meta["classes"] == ["cat", "dog"]


def test_class_whose_only_image_is_unreadable_exits_2(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imgs", {"cat": 4, "dog": 4})
    (root / "fox").mkdir()
    (root / "fox" / "x.jpg").write_bytes(b"nope")
    code, err = run(["-f", job(tmp_path, dataset={"path": str(root)})], capsys)
    assert code == EXIT_INVALID_JOB and "class 'fox' has no readable images" in err


def test_train_val_layout_and_flags_override_file(tmp_path, capsys):
    make_image_folder(tmp_path / "imgs" / "train", {"a": 6, "b": 6})
    make_image_folder(tmp_path / "imgs" / "val", {"a": 3, "b": 3}, seed=1)
    path = job(tmp_path, dataset={"path": str(tmp_path / "imgs")})
    code, err = run(["-f", path, "--epochs", "2", "--output", tmp_path / "other"], capsys)
    assert code == EXIT_OK, err
    meta = json.loads((tmp_path / "other" / "model.json").read_text())
    assert meta["epochs"] == 2 and meta["dataset"]["train"] == 12 and meta["dataset"]["val"] == 6
    assert "train/ + val/" in meta["dataset"]["source"]


def test_predict_prints_class_and_probability(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imgs", {"cat": 6, "dog": 6})
    assert run(["-f", job(tmp_path, dataset={"path": str(root)})], capsys)[0] == EXIT_OK
    code = main(["predict", "--model", str(tmp_path / "out"), "--json", str(root / "cat" / "0.png")])
    out = json.loads(capsys.readouterr().out.strip())
    assert code == EXIT_OK and out["predictions"][0]["class"] in ("cat", "dog")
    assert 0.0 <= out["predictions"][0]["probability"] <= 1.0


def test_validate_prints_resolved_spec(tmp_path, capsys):
    assert main(["validate", "-f", str(job(tmp_path, dataset={"builtin": "digits"}))]) == EXIT_OK
    assert "valFraction: 0.2" in capsys.readouterr().out


def test_console_entry_point_runs_as_a_process(tmp_path):
    path = write_job(tmp_path / "bad.yaml", {"dataset": {"builtin": "digits"}, "training": {"epochs": 0}})
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer", "-f", str(path)], capture_output=True, text=True)
    assert proc.returncode == EXIT_INVALID_JOB and "spec.training.epochs" in proc.stderr
    assert Image  # PIL is importable in the trainer environment


def test_termination_message_summarises_the_result(tmp_path, capsys, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_LOG", str(log))
    root = make_image_folder(tmp_path / "imgs", {"cat": 5, "dog": 5})
    assert run(["-f", job(tmp_path, dataset={"path": str(root)})], capsys)[0] == EXIT_OK
    summary = json.loads(log.read_text())
    assert summary["weightsFile"] == "model.safetensors" and len(summary["sha256"]) == 64
    write_job(tmp_path / "bad.yaml", {"dataset": {"builtin": "digits"}, "bogus": 1})
    assert run(["-f", tmp_path / "bad.yaml"], capsys)[0] == EXIT_INVALID_JOB
    assert log.read_text().startswith("JobFileError: spec.bogus")


def test_sigterm_in_a_real_process_checkpoints_mid_epoch_exits_75_and_the_rerun_resumes(tmp_path):
    """The pod contract: SIGTERM → finish the step, save, exit 75 (preempted) with the reason in the
    termination log; the next run of the same command resumes from that checkpoint and finishes."""
    import os
    import signal
    import time

    from finetune_api.errors import EXIT_PREEMPTED

    path = job(tmp_path, dataset={"builtin": "digits", "imageSize": 16, "classes": ["0", "1"], "maxImagesPerClass": 40},
               training={**TINY["training"], "epochs": 4, "logEverySteps": 1, "batchSize": 8,
                         "featureCache": "off"})
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}
    cmd = [sys.executable, "-m", "finetune_trainer", "-f", str(path), "--report", "jsonl"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    steps = 0
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "step" and event["epoch"] == 2:
            steps += 1
            if steps == 3:
                proc.send_signal(signal.SIGTERM)
                break
    deadline = time.monotonic() + 120
    code = proc.wait(timeout=max(1, deadline - time.monotonic()))
    err = proc.stderr.read()
    assert code == EXIT_PREEMPTED, err[-2000:]
    saved = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert any("epoch-0002-step-" in name for name in saved), saved
    assert "Preempted" in (tmp_path / "termination-log").read_text()
    assert not (tmp_path / "out" / "model.json").exists()

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == EXIT_OK, again.stderr[-2000:]
    start = next(json.loads(ln) for ln in again.stdout.splitlines() if '"start"' in ln)
    assert start["resumeCount"] == 1 and start["startEpoch"] == 2, start
    assert json.loads((tmp_path / "out" / "model.json").read_text())["resumedFromEpoch"] == 1
