"""A corpus of hostile and broken files around an otherwise valid job: each ends in one clear line and the
right exit code, runs nothing planted, leaves no temp file and changes no good file.

The kinds: the job file (bytes, encodings, sizes, YAML bombs, Python tags), weights, checkpoints (a broken
newest one falls back to the one before, or a fresh start), the feature cache, dataset and predict images,
exports read by `predict` / `evaluate` / `finetune-serve`, and OS errors on the output volume (a file where a
folder should be, a read-only mount, a name too long, permission refused). Archives are fetch.py's (issue 20).

Every case runs the CLI in-process; the runs that train resume a tiny run made once for the module.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hostile_util import make_runs
from PIL import Image
from safetensors.torch import save_file
from trainer_util import make_image_folder, write_job

from finetune_api.errors import EXIT_INVALID_JOB, EXIT_OK, EXIT_RUNTIME_ERROR
from finetune_trainer import checkpoint as ckpt
from finetune_trainer import feature_store
from finetune_trainer.cli import main

pytestmark = pytest.mark.unit


class Planted:
    """Unpickling this creates the marker folder: what a planted pickle would do instead of loading."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


# ---------------------------------------------------------------- the runs the cases start from


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    return make_runs(tmp_path_factory.mktemp("made"))


@dataclass
class Ctx:
    tmp: Path
    made: dict
    marker: Path
    monkeypatch: pytest.MonkeyPatch
    cleanups: list[Callable[[], object]] = field(default_factory=list)

    def job(self, output: Path | None = None, **spec) -> Path:
        base = json.loads(json.dumps(self.made["spec"]))
        base["output"]["path"] = str(output or self.tmp / "out")
        for key, value in spec.items():
            base[key] = {**base.get(key, {}), **value}
        return write_job(self.tmp / "job.yaml", base)

    def run_from(self, name: str) -> Path:
        out = self.tmp / "out"
        shutil.copytree(self.made[name], out)
        return out

    def image(self, name: str = "img.png") -> Path:
        path = self.tmp / name
        Image.new("RGB", (20, 20), (200, 10, 10)).save(path)
        return path


@dataclass
class Expect:
    argv: list
    code: int
    says: str  # in the one error line (or, for a fallback, the one warning line)
    precious: list[Path] = field(default_factory=list)  # good files that must come out byte for byte unchanged
    warning: bool = False  # the run succeeds after a fallback that one warning line names
    check: Callable[[], None] = lambda: None
    cli: Callable[[list[str]], int] = main


CASES: dict[str, Callable[[Ctx], Expect]] = {}


def case(kind: str):
    def register(build: Callable[[Ctx], Expect]) -> Callable[[Ctx], Expect]:
        CASES[f"{kind}: {build.__name__.replace('_', ' ')}"] = build
        return build
    return register


# ---------------------------------------------------------------- the job file


def _job_bytes(c: Ctx, data: bytes, says: str) -> Expect:
    (c.tmp / "job.yaml").write_bytes(data)
    return Expect(["-f", c.tmp / "job.yaml"], EXIT_INVALID_JOB, says)


@case("job file")
def invalid_utf8(c: Ctx) -> Expect:
    return _job_bytes(c, b"spec:\n  model: \xff\xfe\xfa caf\xe9\n", "not valid YAML")


@case("job file")
def utf16_without_bom(c: Ctx) -> Expect:
    return _job_bytes(c, "spec: {}\n".encode("utf-16-le"), "not valid YAML")


@case("job file")
def random_binary(c: Ctx) -> Expect:
    return _job_bytes(c, bytes(range(256)) * 16, "not valid YAML")


@case("job file")
def nul_bytes_in_yaml(c: Ctx) -> Expect:
    return _job_bytes(c, b"spec:\n  model:\x00 {}\n", "not valid YAML")


@case("job file")
def two_mebibytes(c: Ctx) -> Expect:
    return _job_bytes(c, b"# padding\n" * 220_000, "larger than")


@case("job file")
def billion_laughs(c: Ctx) -> Expect:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    return _job_bytes(c, ("\n".join(lines) + "\nspec: *a9\n").encode(), "expands to more than")


@case("job file")
def recursive_alias(c: Ctx) -> Expect:
    return _job_bytes(c, b"spec: &s {model: {}, loop: *s}\n", "refers to itself")


@case("job file")
def nested_a_hundred_thousand_deep(c: Ctx) -> Expect:
    return _job_bytes(c, b"spec: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply")


@case("job file")
def python_object_apply_tag(c: Ctx) -> Expect:
    return _job_bytes(c, f"spec: !!python/object/apply:os.makedirs [{c.marker}]\n".encode(), "not valid YAML")


@case("job file")
def python_object_new_tag(c: Ctx) -> Expect:
    data = f"spec: !!python/object/new:os.makedirs {{args: [{c.marker}]}}\n".encode()
    return _job_bytes(c, data, "not valid YAML")


@case("job file")
def two_documents(c: Ctx) -> Expect:
    return _job_bytes(c, b"spec: {}\n---\nspec: {}\n", "not valid YAML")


@case("job file")
def a_list_not_a_mapping(c: Ctx) -> Expect:
    return _job_bytes(c, b"- model\n- dataset\n", "must be a YAML mapping")


@case("job file")
def empty(c: Ctx) -> Expect:
    return _job_bytes(c, b"", "must be a YAML mapping")


@case("job file")
def a_directory(c: Ctx) -> Expect:
    (c.tmp / "jobdir").mkdir()
    return Expect(["-f", c.tmp / "jobdir"], EXIT_INVALID_JOB, "is a directory")


@case("job file")
def missing(c: Ctx) -> Expect:
    return Expect(["-f", c.tmp / "nope.yaml"], EXIT_INVALID_JOB, "No such file or directory")


@case("job file")
def under_a_file_enotdir(c: Ctx) -> Expect:
    (c.tmp / "plain").write_text("x")
    return Expect(["-f", c.tmp / "plain" / "job.yaml"], EXIT_INVALID_JOB, "Not a directory")


@case("job file")
def name_too_long(c: Ctx) -> Expect:
    return Expect(["-f", c.tmp / ("j" * 300 + ".yaml")], EXIT_INVALID_JOB, "File name too long")


@case("job file")
def a_fifo_without_writer(c: Ctx) -> Expect:
    os.mkfifo(c.tmp / "job.fifo")  # a blocking read would hang the trainer forever
    return Expect(["-f", c.tmp / "job.fifo"], EXIT_INVALID_JOB, "must be a YAML mapping")


@case("job file")
def permission_denied(c: Ctx) -> Expect:
    path = c.job()
    real = os.open

    def refuse(p, *a, **k):  # root reads through mode 000, so EACCES is injected
        if str(p) == str(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return real(p, *a, **k)

    c.monkeypatch.setattr(os, "open", refuse)
    return Expect(["-f", path], EXIT_INVALID_JOB, "Permission denied")


# ---------------------------------------------------------------- weights (model.weights.path)


def _weights(c: Ctx, name: str, write: Callable[[Path], object], says: str) -> Expect:
    path = c.tmp / name
    write(path)
    job = c.job(model={"weights": {"source": "file", "path": str(path)}})
    return Expect(["-f", job], EXIT_INVALID_JOB, says, check=lambda: _nothing_written(c.tmp / "out"))


def _nothing_written(out: Path) -> None:
    assert not out.exists(), "a job refused for its input wrote to its output"


@case("weights")
def planted_pickle_in_a_torch_zip(c: Ctx) -> Expect:
    return _weights(c, "w.pt", lambda p: torch.save({"fc.weight": Planted(c.marker)}, p), "not a readable checkpoint")


@case("weights")
def planted_legacy_pickle(c: Ctx) -> Expect:
    return _weights(c, "w.pth", lambda p: p.write_bytes(pickle.dumps({"x": Planted(c.marker)})),
                    "not a readable checkpoint")


@case("weights")
def random_bytes(c: Ctx) -> Expect:
    return _weights(c, "w.pt", lambda p: p.write_bytes(os.urandom(4096)), "not a readable checkpoint")


@case("weights")
def truncated_zip(c: Ctx) -> Expect:
    def write(p: Path) -> None:
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, p)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return _weights(c, "w.pt", write, "not a readable checkpoint")


@case("weights")
def safetensors_of_random_bytes(c: Ctx) -> Expect:
    return _weights(c, "w.safetensors", lambda p: p.write_bytes(os.urandom(2048)), "not a readable checkpoint")


@case("weights")
def safetensors_header_claiming_an_exabyte(c: Ctx) -> Expect:
    return _weights(c, "w.safetensors", lambda p: p.write_bytes(b"\xff" * 7 + b"\x0f" + b"{}"),
                    "not a readable checkpoint")


@case("weights")
def safetensors_of_the_wrong_shapes(c: Ctx) -> Expect:
    return _weights(c, "w.safetensors", lambda p: save_file({"conv1.weight": torch.zeros(2, 2)}, str(p)),
                    "does not fit")


@case("weights")
def not_tensors(c: Ctx) -> Expect:
    return _weights(c, "w.pt", lambda p: torch.save({"conv1.weight": [1, 2, 3]}, p), "holds no state_dict")


@case("weights")
def a_directory_weights(c: Ctx) -> Expect:
    return _weights(c, "wdir.pt", lambda p: p.mkdir(), "model.weights.path")


@case("weights")
def a_fifo(c: Ctx) -> Expect:
    return _weights(c, "w.fifo.pt", os.mkfifo, "not a regular file")


@case("weights")
def missing_weights(c: Ctx) -> Expect:
    return _weights(c, "gone.pt", lambda p: None, "No such file or directory")


# ---------------------------------------------------------------- checkpoints: fall back, keep, say so


def _broken_newest(c: Ctx, write: Callable[[Path], object], says: str = "moved aside") -> Expect:
    out = c.run_from("midrun")
    newest, before = out / "checkpoints" / "epoch-0002.pt", out / "checkpoints" / "epoch-0001.pt"
    newest.unlink()
    write(newest)
    planted = newest.read_bytes() if newest.is_file() else None

    def check() -> None:
        aside = newest.with_name(newest.name + ".unreadable")
        assert aside.exists(), "the unreadable checkpoint was not kept aside"
        if planted is not None:
            assert aside.read_bytes() == planted
        assert ckpt.load_checkpoint(out / "checkpoints" / "epoch-0002.pt")["epoch"] == 2  # retrained from epoch 1
        assert (out / "model.json").is_file()

    return Expect(["-f", c.job(), "--epochs", 2], EXIT_OK, says, precious=[before], warning=True, check=check)


@case("checkpoint")
def random_bytes_checkpoint(c: Ctx) -> Expect:
    return _broken_newest(c, lambda p: p.write_bytes(os.urandom(3000)))


@case("checkpoint")
def empty_file(c: Ctx) -> Expect:
    return _broken_newest(c, lambda p: p.write_bytes(b""))


@case("checkpoint")
def planted_pickle(c: Ctx) -> Expect:
    return _broken_newest(c, lambda p: torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION,
                                                   "epoch": Planted(c.marker)}, p))


@case("checkpoint")
def truncated(c: Ctx) -> Expect:
    good = (c.made["midrun"] / "checkpoints" / "epoch-0002.pt").read_bytes()
    return _broken_newest(c, lambda p: p.write_bytes(good[: len(good) // 2]))


@case("checkpoint")
def one_flipped_bit_in_a_tensor(c: Ctx) -> Expect:
    source = c.made["midrun"] / "checkpoints" / "epoch-0002.pt"
    with zipfile.ZipFile(source) as z:  # the largest record: tensor bytes, which torch reads without a CRC check
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(source.read_bytes())
    name_and_extra = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") + \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_and_extra + info.file_size // 2] ^= 0x01
    return _broken_newest(c, lambda p: p.write_bytes(bytes(data)), "does not match the digest")


@case("checkpoint")
def a_tensor_changed_behind_its_digest(c: Ctx) -> Expect:
    def write(p: Path) -> None:
        state = torch.load(c.made["midrun"] / "checkpoints" / "epoch-0002.pt", weights_only=True)
        next(iter(state["model"].values())).add_(1.0)
        torch.save(state, p)
    return _broken_newest(c, write, "does not match the digest")


@case("checkpoint")
def foreign_state_dict(c: Ctx) -> Expect:
    return _broken_newest(c, lambda p: torch.save({"fc.weight": torch.zeros(3, 512)}, p),
                          "not a finetune-operator checkpoint")


@case("checkpoint")
def older_format_version(c: Ctx) -> Expect:
    return _broken_newest(c, lambda p: torch.save({"epoch": 2, "fingerprint": "x", "model": {}}, p), "version 1")


@case("checkpoint")
def our_header_missing_fields(c: Ctx) -> Expect:
    return _broken_newest(c, lambda p: torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "epoch": 2}, p),
                          "damaged checkpoint")


@case("checkpoint")
def a_directory_checkpoint(c: Ctx) -> Expect:
    return _broken_newest(c, lambda p: p.mkdir(), "is a directory")


@case("checkpoint")
def both_broken_start_fresh(c: Ctx) -> Expect:
    out = c.run_from("midrun")
    for path in (out / "checkpoints").glob("epoch-*.pt"):
        path.write_bytes(b"PK\x03\x04 not really")
    expect = Expect(["-f", c.job(), "--epochs", 1], EXIT_OK, "starting fresh", warning=True)
    expect.check = lambda: (assert_exists(out / "checkpoints" / "epoch-0001.pt.unreadable"),
                            assert_exists(out / "model.json"))
    return expect


def assert_exists(path: Path) -> None:
    assert path.exists(), path


@case("checkpoint")
def another_specs_run_is_refused_not_overwritten(c: Ctx) -> Expect:
    out = c.run_from("midrun")
    job = c.job(training={"learningRate": 0.5})
    return Expect(["-f", job], EXIT_INVALID_JOB, "different spec", precious=list((out / "checkpoints").glob("*.pt")))


# ---------------------------------------------------------------- the feature cache: never trusted, recomputed


def _broken_cache(c: Ctx, write: Callable[[Path], object], says: str) -> Expect:
    out = c.run_from("midrun")
    (path,) = (out / "cache").glob("features-*.pt")
    path.unlink()
    write(path)
    return Expect(["-f", c.job(), "--epochs", 3], EXIT_OK, says, warning=True,  # epoch-0001 goes by retention
                  precious=[out / "checkpoints" / "epoch-0002.pt"], check=lambda: assert_exists(out / "model.json"))


@case("feature cache")
def random_bytes_cache(c: Ctx) -> Expect:
    return _broken_cache(c, lambda p: p.write_bytes(os.urandom(5000)), "unreadable")


@case("feature cache")
def planted_pickle_cache(c: Ctx) -> Expect:
    return _broken_cache(c, lambda p: torch.save({"key": Planted(c.marker)}, p), "unreadable")


@case("feature cache")
def tensors_that_do_not_match_their_digest(c: Ctx) -> Expect:
    def write(p: Path) -> None:
        data = torch.load(next((c.made["midrun"] / "cache").glob("features-*.pt")), weights_only=True)
        data["trainX"] = data["trainX"] + 1
        torch.save(data, p)
    return _broken_cache(c, write, "does not match its digest")


@case("feature cache")
def not_a_mapping(c: Ctx) -> Expect:
    return _broken_cache(c, lambda p: torch.save([1, 2, 3], p), "unreadable")


# ---------------------------------------------------------------- images: evaluate skips, predict names them


def _png_bomb(path: Path) -> None:
    """A PNG whose header declares 100000 x 100000 pixels: PIL refuses it before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = (100_000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _evaluate_with(c: Ctx, plant: Callable[[Path], object], code: int = EXIT_OK) -> Expect:
    data = make_image_folder(c.tmp / "data", {"0": 3, "1": 3})
    plant(data / "1")
    says = "unreadable image" if code == EXIT_OK else "holds no readable images"
    return Expect(["evaluate", "--model", c.made["export"], "--data", data, "--report-dir", c.tmp / "report"],
                  code, says, warning=code == EXIT_OK)


@case("image")
def truncated_png(c: Ctx) -> Expect:
    def plant(folder: Path) -> None:
        good = (folder / "0.png").read_bytes()
        (folder / "cut.png").write_bytes(good[: len(good) // 2])
    return _evaluate_with(c, plant)


@case("image")
def zero_bytes(c: Ctx) -> Expect:
    return _evaluate_with(c, lambda f: (f / "empty.jpg").write_bytes(b""))


@case("image")
def text_named_png(c: Ctx) -> Expect:
    return _evaluate_with(c, lambda f: (f / "notes.png").write_text("just text"))


@case("image")
def decompression_bomb(c: Ctx) -> Expect:
    return _evaluate_with(c, lambda f: _png_bomb(f / "bomb.png"))


@case("image")
def every_image_broken(c: Ctx) -> Expect:
    data = c.tmp / "data"
    for name in ("0", "1"):
        (data / name).mkdir(parents=True)
        (data / name / "x.png").write_bytes(os.urandom(100))
    (data / "1" / "loop.png").symlink_to(data / "1" / "loop.png")  # a symlink loop is no image either
    return Expect(["evaluate", "--model", c.made["export"], "--data", data], EXIT_INVALID_JOB,
                  "holds no readable images")


@case("image")
def dataset_folder_permission_denied(c: Ctx) -> Expect:
    data = make_image_folder(c.tmp / "data", {"a": 3, "b": 3})
    real = Path.iterdir

    def refuse(self: Path):  # root reads through mode 000, so EACCES is injected
        if self == data:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)

    c.monkeypatch.setattr(Path, "iterdir", refuse)
    return Expect(["-f", c.job(dataset={"path": str(data), "builtin": None, "classes": None})], EXIT_INVALID_JOB,
                  "dataset.path: ", check=lambda: _nothing_written(c.tmp / "out"))


@case("image")
def dataset_path_under_a_file(c: Ctx) -> Expect:
    (c.tmp / "plain").write_text("x")
    job = c.job(dataset={"path": str(c.tmp / "plain" / "images"), "builtin": None, "classes": None})
    return Expect(["-f", job], EXIT_INVALID_JOB, "dataset.path: ")


def _predict(c: Ctx, image: Path) -> Expect:
    return Expect(["predict", "--model", c.made["export"], image], EXIT_INVALID_JOB, "unreadable image")


@case("image")
def predict_a_truncated_jpeg(c: Ctx) -> Expect:
    Image.new("RGB", (64, 64), (1, 2, 3)).save(c.tmp / "a.jpg")
    (c.tmp / "cut.jpg").write_bytes((c.tmp / "a.jpg").read_bytes()[:100])
    return _predict(c, c.tmp / "cut.jpg")


@case("image")
def predict_a_bomb(c: Ctx) -> Expect:
    _png_bomb(c.tmp / "bomb.png")
    return _predict(c, c.tmp / "bomb.png")


@case("image")
def predict_a_fifo(c: Ctx) -> Expect:
    os.mkfifo(c.tmp / "pipe.png")
    return _predict(c, c.tmp / "pipe.png")


@case("image")
def predict_a_directory(c: Ctx) -> Expect:
    (c.tmp / "dir.png").mkdir()
    return _predict(c, c.tmp / "dir.png")


# ---------------------------------------------------------------- exports read by predict / evaluate / serve


def _export(c: Ctx, change: Callable[[Path, dict], object], says: str, argv: str = "predict") -> Expect:
    folder = c.tmp / "export"
    shutil.copytree(c.made["export"], folder)
    meta = json.loads((folder / "model.json").read_text())
    if change(folder, meta) is not False:
        (folder / "model.json").write_text(json.dumps(meta))
    if argv == "serve":
        from finetune_serve.server import main as serve
        return Expect(["--model", folder], 2, says, cli=serve)
    if argv == "evaluate":
        data = make_image_folder(c.tmp / "data", {"0": 2, "1": 2})
        return Expect(["evaluate", "--model", folder, "--data", data], EXIT_INVALID_JOB, says)
    return Expect(["predict", "--model", folder, c.image()], EXIT_INVALID_JOB, says)


def _resigned(folder: Path, meta: dict) -> None:
    """An attacker who edits the weights edits the sha256 too: the loader must still refuse them."""
    meta["sha256"] = hashlib.sha256((folder / meta["weightsFile"]).read_bytes()).hexdigest()


@case("export")
def model_json_not_json(c: Ctx) -> Expect:
    return _export(c, lambda f, m: (f / "model.json").write_text("{nope") and False, "not valid JSON")


@case("export")
def model_json_a_list(c: Ctx) -> Expect:
    return _export(c, lambda f, m: (f / "model.json").write_text("[1, 2]") and False, "not a JSON object")


@case("export")
def model_json_without_classes(c: Ctx) -> Expect:
    return _export(c, lambda f, m: m.pop("classes"), "lacks or mistypes ['classes']")


@case("export")
def model_json_a_directory(c: Ctx) -> Expect:
    def change(folder: Path, meta: dict) -> bool:
        (folder / "model.json").unlink()
        (folder / "model.json").mkdir()
        return False
    return _export(c, change, "holds no readable model.json")


@case("export")
def weights_file_outside_the_export(c: Ctx) -> Expect:
    return _export(c, lambda f, m: m.update(weightsFile="../../../etc/passwd"), "outside the export folder")


@case("export")
def weights_that_do_not_match_the_sha256(c: Ctx) -> Expect:
    def change(folder: Path, meta: dict) -> None:
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (folder / "model.safetensors").write_bytes(bytes(data))
    return _export(c, change, "does not match the sha256")


@case("export")
def corrupt_safetensors_resigned(c: Ctx) -> Expect:
    def change(folder: Path, meta: dict) -> None:
        (folder / "model.safetensors").write_bytes(os.urandom(1000))
        _resigned(folder, meta)
    return _export(c, change, "cannot rebuild the model")


@case("export")
def unknown_architecture(c: Ctx) -> Expect:
    return _export(c, lambda f, m: m.update(architecture="resnet9000"), "cannot rebuild the model")


@case("export")
def class_count_that_does_not_fit_the_weights(c: Ctx) -> Expect:
    return _export(c, lambda f, m: m.update(classes=["a", "b", "c", "d", "e"], numClasses=5),
                   "cannot rebuild the model")


@case("export")
def preprocessing_of_the_wrong_types(c: Ctx) -> Expect:
    return _export(c, lambda f, m: m.update(preprocessing={"resize": "big"}), "cannot rebuild the model")


@case("export")
def evaluate_a_resigned_export_of_other_tensors(c: Ctx) -> Expect:
    def change(folder: Path, meta: dict) -> None:
        save_file({"fc.weight": torch.zeros(1)}, str(folder / "model.safetensors"))
        _resigned(folder, meta)
    return _export(c, change, "cannot rebuild the model", argv="evaluate")


@case("export")
def evaluate_report_dir_under_a_file(c: Ctx) -> Expect:
    data = make_image_folder(c.tmp / "data", {"0": 2, "1": 2})
    (c.tmp / "plain").write_text("x")
    return Expect(["evaluate", "--model", c.made["export"], "--data", data, "--report-dir", c.tmp / "plain" / "r"],
                  EXIT_INVALID_JOB, "--report-dir")


@case("export")
def serve_model_json_not_json(c: Ctx) -> Expect:
    return _export(c, lambda f, m: (f / "model.json").write_bytes(b"\xff\xfe") and False, "not valid JSON", "serve")


@case("export")
def serve_onnx_entry_outside_the_export(c: Ctx) -> Expect:
    onnx = {"file": "../../../../etc/hostname", "sha256": "0" * 64, "input": {"name": "input"},
            "output": {"name": "probabilities"}}
    return _export(c, lambda f, m: m.update(formats={"onnx": {**onnx, "input": {**onnx["input"],
                   "normalizationInGraph": True}}}), "outside the export", "serve")


@case("export")
def serve_onnx_graph_of_garbage_resigned(c: Ctx) -> Expect:
    def change(folder: Path, meta: dict) -> None:
        (folder / "g.onnx").write_bytes(os.urandom(512))
        digest = hashlib.sha256((folder / "g.onnx").read_bytes()).hexdigest()
        meta["formats"] = {"onnx": {"file": "g.onnx", "sha256": digest, "output": {"name": "p"},
                                    "input": {"name": "input", "normalizationInGraph": True}}}
    return _export(c, change, "not an ONNX graph", "serve")


@case("export")
def serve_torch_corrupt_safetensors_resigned(c: Ctx) -> Expect:
    def change(folder: Path, meta: dict) -> None:
        (folder / "model.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"not json")
        _resigned(folder, meta)
    return _export(c, change, "cannot rebuild the model", "serve")


# ---------------------------------------------------------------- the output volume


@case("output volume")
def output_path_is_a_file(c: Ctx) -> Expect:
    (c.tmp / "out").write_text("precious notes")
    return Expect(["-f", c.job()], EXIT_INVALID_JOB, "output.path: ", precious=[c.tmp / "out"])


@case("output volume")
def output_path_on_a_read_only_mount(c: Ctx) -> Expect:
    where = c.tmp / "ro"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root): {mounted.stderr.strip()}")
    c.cleanups.append(lambda: subprocess.run(["umount", "-l", str(where)], check=False))
    return Expect(["-f", c.job(where / "out")], EXIT_INVALID_JOB, "Read-only file system")


@case("output volume")
def output_path_name_too_long(c: Ctx) -> Expect:
    return Expect(["-f", c.job(c.tmp / ("o" * 300))], EXIT_INVALID_JOB, "output.path: ")


@case("output volume")
def output_path_permission_denied(c: Ctx) -> Expect:
    import tempfile

    real = tempfile.mkstemp

    def refuse(*a, dir=None, **k):  # root ignores mode bits: EACCES is injected
        if dir is not None and str(dir).startswith(str(c.tmp / "out")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        return real(*a, dir=dir, **k)

    c.monkeypatch.setattr(tempfile, "mkstemp", refuse)
    return Expect(["-f", c.job()], EXIT_INVALID_JOB, "output.path: ")


@case("output volume")
def checkpoints_folder_is_a_file(c: Ctx) -> Expect:
    out = c.run_from("midrun")
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").write_text("not a folder")
    return Expect(["-f", c.job(), "--epochs", 1], EXIT_INVALID_JOB, "output.path: ", precious=[out / "checkpoints"])


@case("output volume")
def model_json_is_a_directory(c: Ctx) -> Expect:
    out = c.run_from("midrun")
    (out / "model.json").mkdir()
    return Expect(["-f", c.job(), "--epochs", 2], EXIT_INVALID_JOB, "model.json",
                  check=lambda: assert_no_staged(out))


def assert_no_staged(out: Path) -> None:
    assert not list(out.glob(".*.staged")) and (out / "model.json").is_dir()


@case("output volume")
def an_io_error_is_a_retryable_runtime_failure(c: Ctx) -> Expect:
    real = ckpt.torch.save

    def broken(obj, f, *a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(f))

    out = c.run_from("midrun")
    c.monkeypatch.setattr(ckpt.torch, "save", lambda obj, f, *a, **k: broken(obj, f) if "epoch" in str(f) else
                          real(obj, f, *a, **k))
    return Expect(["-f", c.job(), "--epochs", 3], EXIT_RUNTIME_ERROR, "Input/output error",
                  precious=list((out / "checkpoints").glob("*.pt")))


# ---------------------------------------------------------------- the one test


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith(("error:", "finetune-serve:")) or "\terror:" in ln]


def _snapshot(paths: list[Path]) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.is_file() else None for p in paths}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file(name: str, made, tmp_path: Path, capsys, caplog, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tmp_path, made, tmp_path / "planted-code-ran", monkeypatch)
    try:
        expect = CASES[name](ctx)
        before = _snapshot(expect.precious)
        code = expect.cli([str(a) for a in expect.argv])
    finally:
        for undo in ctx.cleanups:
            undo()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code == expect.code, err
    errors = _error_lines(err)
    if expect.warning:
        assert not errors, err
        # In-process, log records go to pytest's handler instead of the CLI's stderr handler.
        logged = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records if r.levelname == "WARNING"]
        said = [ln for ln in [*err.splitlines(), *logged] if expect.says in ln]
        assert len(said) == 1, (err, logged)
    else:
        assert len(errors) == 1 and expect.says in errors[0], err
    assert not ctx.marker.exists(), "the planted code ran"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")], "a temp file was left behind"
    assert _snapshot(expect.precious) == before, "a good file was changed"
    expect.check()


def test_the_corpus_covers_every_kind_with_forty_cases_or_more() -> None:
    kinds = {name.split(":")[0] for name in CASES}
    assert kinds == {"job file", "weights", "checkpoint", "feature cache", "image", "export", "output volume"}
    assert len(CASES) >= 40


def test_a_hostile_job_file_exits_2_in_a_real_process(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "job.yaml").write_text(f"spec: !!python/object/apply:os.makedirs [{marker}]\n")
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer", "-f", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_INVALID_JOB and not marker.exists()
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [ln for ln in _error_lines(proc.stderr)], \
        proc.stderr


def test_the_serve_and_trainer_export_limits_agree() -> None:
    from finetune_serve import backends
    from finetune_trainer import export

    assert backends.MAX_META_BYTES == export.MAX_META_BYTES and backends.META_FILE == export.META_FILE


def test_the_cache_loader_ignores_a_file_of_another_key(tmp_path: Path) -> None:
    path = feature_store.path_for(tmp_path, "k" * 64)
    path.parent.mkdir(parents=True)
    torch.save({"key": "other"}, path)
    assert feature_store.load(tmp_path, "k" * 64) is None


def test_a_broken_or_planted_teacher_cache_is_ignored_without_running_code(tmp_path: Path) -> None:
    from finetune_trainer import teacher

    marker = tmp_path / "ran"
    path = teacher.store_path(tmp_path, "k" * 64)
    path.parent.mkdir(parents=True)
    for write in (lambda: torch.save({"key": "k" * 64, "train": Planted(marker)}, path),
                  lambda: path.write_bytes(os.urandom(700)), lambda: torch.save(["not", "a", "mapping"], path)):
        write()
        assert teacher.load_store(tmp_path, "k" * 64) is None
    assert not marker.exists()
