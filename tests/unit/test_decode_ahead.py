"""Decoding ahead (finetune_trainer.decode_ahead): the same pixels, each image taken once, bounded, and
recorded; started only where a core is spare and a single process reads the dataset."""

import json

import numpy as np
import pytest
from trainer_util import make_image_folder, write_job

from finetune_api.errors import EXIT_OK
from finetune_api.spec import parse_spec
from finetune_trainer import decode_ahead
from finetune_trainer.cli import main
from finetune_trainer.data import Sample, load_splits
from finetune_trainer.decode_ahead import DecodeAhead
from finetune_trainer.image_files import reading_order

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def no_active_decoder():
    decode_ahead.finish()
    yield
    decode_ahead.finish()


def folder(tmp_path, layout: str = "train/val"):
    if layout == "train/val":
        make_image_folder(tmp_path / "imgs" / "train", {"a": 4, "b": 3})
        make_image_folder(tmp_path / "imgs" / "val", {"a": 2, "b": 2}, seed=1)
        make_image_folder(tmp_path / "imgs" / "test", {"a": 1, "b": 1}, seed=2)
    else:
        make_image_folder(tmp_path / "imgs", {"a": 5, "b": 5})
    return tmp_path / "imgs"


def test_decoded_images_are_what_sample_load_makes_and_are_taken_once(tmp_path):
    paths = reading_order(folder(tmp_path))
    ahead = DecodeAhead(paths)
    ahead._run()  # the thread's work, in this thread: deterministic
    assert ahead.decoded == len(paths) == 4 + 3 + 2 + 2 + 1 + 1
    for p in paths:
        image = ahead.take(str(p))
        assert image is not None and image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), np.asarray(Sample(0, path=str(p)).load()))
        assert ahead.take(str(p)) is None  # once: a second read decodes in line
    assert ahead.held == 0 and ahead.describe()["taken"] == len(paths)


def test_an_image_read_before_the_thread_got_there_is_not_decoded_again(tmp_path):
    paths = reading_order(folder(tmp_path))
    ahead = DecodeAhead(paths)
    assert ahead.take(str(paths[0])) is None  # the pass got there first and decodes it itself
    ahead._run()
    assert ahead.decoded == len(paths) - 1 and ahead.take(str(paths[0])) is None


def test_budget_and_stop_bound_the_work(tmp_path):
    paths = reading_order(folder(tmp_path))
    one = DecodeAhead(paths, budget=1)  # over budget after the first image
    one._run()
    assert one.decoded == 1
    stopped = DecodeAhead(paths)
    stopped.stop()
    stopped._run()
    assert stopped.decoded == 0


def test_an_unreadable_file_is_left_for_sample_load_to_report(tmp_path):
    root = folder(tmp_path, layout="flat")
    bad = root / "a" / "0.png"
    bad.write_bytes(b"not a png")
    ahead = DecodeAhead(reading_order(root))
    ahead._run()
    assert ahead.decoded == 9 and ahead.take(str(bad)) is None
    with pytest.raises(Exception, match="cannot identify image file"):
        Sample(0, path=str(bad)).load()


@pytest.mark.parametrize("layout", ["train/val", "flat"])
def test_reading_order_lists_the_files_of_the_splits_in_the_frozen_pass_order(tmp_path, layout):
    root = folder(tmp_path, layout)
    spec = parse_spec({"dataset": {"path": str(root)}, "model": {"weights": {"source": "none"}}})
    splits = load_splits(spec.dataset, 0)
    order = [str(p) for p in reading_order(root)]
    read = [s.path for s in splits.train + splits.val + splits.test]
    assert sorted(order) == sorted(read)
    if layout == "train/val":  # train, then val, then test, each in data.py's order: what the pass reads first
        assert order == read


def test_started_only_with_a_spare_core_and_a_single_process(tmp_path, monkeypatch):
    root = folder(tmp_path)
    monkeypatch.setattr(decode_ahead.cpus, "spare_cores", lambda: 0)
    assert decode_ahead.start(str(root)) is None
    monkeypatch.setattr(decode_ahead.cpus, "spare_cores", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert decode_ahead.start(str(root)) is None
    monkeypatch.delenv("WORLD_SIZE")
    assert decode_ahead.start(None) is None and decode_ahead.start(str(tmp_path / "missing")) is None
    assert decode_ahead.start(str(root)) is not None
    assert decode_ahead.finish()["images"] >= 0 and decode_ahead.describe() is None


def test_a_train_run_records_what_was_decoded_ahead_and_the_same_model_results(tmp_path, capsys, monkeypatch):
    root = folder(tmp_path)
    spec = {"model": {"weights": {"source": "none"}}, "dataset": {"path": str(root), "imageSize": 16},
            "training": {"epochs": 1, "batchSize": 4, "device": "cpu"}}
    runs = {}
    for name, cores in (("ahead", 1), ("inline", 0)):
        monkeypatch.setattr(decode_ahead.cpus, "spare_cores", lambda cores=cores: cores)
        path = write_job(tmp_path / f"{name}.yaml", {**spec, "output": {"path": str(tmp_path / name)}})
        assert main(["-f", str(path)]) == EXIT_OK, capsys.readouterr().err
        runs[name] = json.loads((tmp_path / name / "model.json").read_text())
    ahead = runs["ahead"]["timings"]["decodedAhead"]
    assert 1 <= ahead["images"] <= 13 and ahead["taken"] <= ahead["images"]
    assert "decodedAhead" not in runs["inline"]["timings"]
    assert runs["ahead"]["sha256"] == runs["inline"]["sha256"]  # the same pixels: the same weights, bit for bit
