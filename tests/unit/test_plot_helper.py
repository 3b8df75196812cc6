"""The plot helper (finetune_trainer.plot_helper): the same pictures as in-process drawing, errors reported as
the trainer's own, and a helper that is gone or broken costs nothing but the in-process draw."""

import json
import logging

import numpy as np
import pytest
from PIL import Image
from trainer_util import make_image_folder, write_job

from finetune_api.errors import EXIT_OK
from finetune_trainer import model_report, plot_helper
from finetune_trainer.cli import main
from finetune_trainer.plot_helper import PlotError, PlotHelper
from finetune_trainer.plots import draw_report

pytestmark = pytest.mark.unit

REPORT = {"confusionMatrix": {"labels": ["cat", "dog", "fox"], "matrix": [[3, 1, 0], [0, 4, 0], [1, 0, 2]]}}
HISTORY = [{"epoch": 1, "trainLoss": 1.2, "valLoss": 1.0, "valAccuracy": 0.5},
           {"epoch": 2, "trainLoss": 0.8, "valLoss": 0.9, "valAccuracy": 0.7}]
NAMES = {"confusionMatrix": "cm.png", "trainingCurves": "curves.png"}


@pytest.fixture
def helper():
    started = PlotHelper.start()
    assert started is not None
    yield started
    started.close()


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_helper_draws_what_this_process_draws(tmp_path, helper):
    (tmp_path / "helper").mkdir()
    (tmp_path / "here").mkdir()
    made = helper.draw(tmp_path / "helper", REPORT, HISTORY, NAMES)
    assert made == draw_report(tmp_path / "here", REPORT, HISTORY, NAMES) == {"trainingCurves": "curves.png"}
    for name in NAMES.values():
        np.testing.assert_array_equal(pixels(tmp_path / "helper" / name), pixels(tmp_path / "here" / name))
    assert helper.draw(tmp_path / "helper", REPORT, None, NAMES) == {}  # no history: the matrix only, again


def test_a_drawing_error_comes_back_as_the_plotting_error(tmp_path, helper):
    broken = {"confusionMatrix": {"labels": ["a", "b"], "matrix": [[1, 2, 3]]}}  # 3 counts for 2 x 2 cells
    with pytest.raises(PlotError, match="ValueError"):
        helper.draw(tmp_path, broken, None, NAMES)
    assert helper.process.poll() is None  # one bad report does not end the helper
    assert helper.draw(tmp_path, REPORT, None, NAMES) == {} and (tmp_path / "cm.png").is_file()


def test_a_report_written_with_a_failing_helper_logs_and_drops_the_picture(tmp_path, helper, monkeypatch, caplog):
    monkeypatch.setattr(plot_helper, "_active", helper)
    broken = {"confusionMatrix": {"labels": ["a", "b"], "matrix": [[1, 2, 3]]}}
    names = {"confusionMatrix": "cm.png"}
    with caplog.at_level(logging.WARNING):
        assert model_report._plots(tmp_path, broken, HISTORY, names) == {}
    assert names == {} and "evaluation plots not written: ValueError" in caplog.text


def test_a_helper_that_is_gone_leaves_the_drawing_to_this_process(tmp_path, helper, monkeypatch):
    helper.process.kill()
    helper.process.wait()
    assert helper.draw(tmp_path, REPORT, HISTORY, NAMES) is None
    monkeypatch.setattr(plot_helper, "_active", helper)
    names = {"confusionMatrix": "cm.png"}
    assert model_report._plots(tmp_path, REPORT, HISTORY, names) == {"trainingCurves": model_report.CURVES_PNG}
    assert (tmp_path / "cm.png").is_file() and (tmp_path / model_report.CURVES_PNG).is_file()


def test_a_train_run_draws_through_the_helper_and_ends_it(tmp_path, capsys, monkeypatch):
    root = make_image_folder(tmp_path / "imgs", {"a": 5, "b": 5})
    monkeypatch.setattr(plot_helper.cpus, "spare_cores", lambda: 1)
    seen = []
    real_draw = PlotHelper.draw

    def draw(self, *args):
        seen.append(self.process.pid)
        return real_draw(self, *args)

    monkeypatch.setattr(PlotHelper, "draw", draw)
    spec = {"model": {"weights": {"source": "none"}}, "dataset": {"path": str(root), "imageSize": 16},
            "training": {"epochs": 1, "batchSize": 4, "device": "cpu"}, "output": {"path": str(tmp_path / "out")}}
    assert main(["-f", str(write_job(tmp_path / "job.yaml", spec))]) == EXIT_OK, capsys.readouterr().err
    files = json.loads((tmp_path / "out" / "model.json").read_text())["evaluation"]["files"]
    assert len(seen) == 1 and plot_helper.active() is None  # drawn by the helper, which the run then ended
    for key in ("confusionMatrix", "trainingCurves"):
        assert Image.open(tmp_path / "out" / files[key]).size[0] > 100


def test_no_helper_without_a_spare_core_or_in_a_torchrun_group(monkeypatch):
    monkeypatch.setattr(plot_helper.cpus, "spare_cores", lambda: 0)
    assert plot_helper.start() is None
    monkeypatch.setattr(plot_helper.cpus, "spare_cores", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert plot_helper.start() is None
