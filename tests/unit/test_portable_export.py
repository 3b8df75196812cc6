"""output.formats: ONNX and TorchScript exports, checked against the PyTorch model on the val images, the
Triton/KServe model repository and the model card beside them, and a corrupted format caught before the
export commits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from trainer_util import tiny_spec

from finetune_api.errors import JobFileError
from finetune_api.spec import parse_spec
from finetune_trainer import portable
from finetune_trainer.data import load_splits
from finetune_trainer.export import sha256_file
from finetune_trainer.fit import fit
from finetune_trainer.predict import Predictor
from finetune_trainer.report import Reporter

pytestmark = pytest.mark.unit
ALL = ["safetensors", "onnx", "torchscript"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("portable") / "out"
    fit(tiny_spec(out, **{"output.formats": ALL, "output.foldNormalization": True, "training.precision": "fp32"}),
        Reporter(), out, name="digits")
    return out


def val_batch(meta: dict) -> tuple[torch.Tensor, np.ndarray]:
    """The val images as the trainer's eval transform makes them, and as plain [0,1] pixels."""
    spec = parse_spec(meta["spec"])
    splits = load_splits(spec.dataset, spec.training.seed)
    prep = Predictor.load(meta["_dir"]).preprocessing
    normalized = torch.stack([prep.eval_transform()(s.load()) for s in splits.val])
    mean, std = torch.tensor(prep.mean).view(1, 3, 1, 1), torch.tensor(prep.std).view(1, 3, 1, 1)
    return normalized, (normalized * std + mean).numpy()


def test_onnx_and_torchscript_agree_with_pytorch_on_every_val_image(export: Path) -> None:
    meta = json.loads((export / "model.json").read_text())
    meta["_dir"] = export
    normalized, pixels = val_batch(meta)
    with torch.inference_mode():
        reference = Predictor.load(export).model(normalized).softmax(1).numpy()
    for fmt in ("onnx", "torchscript"):
        entry = meta["formats"][fmt]
        parity = entry["parity"]
        assert parity["images"] == len(normalized) and parity["top1Agreement"] == 1.0
        assert 0.0 <= parity["maxAbsDiff"] <= parity["tolerance"] == 1e-4
        assert entry["sha256"] == sha256_file(export / entry["file"])
        probs = portable.RUNNERS[fmt](export / entry["file"])(pixels)  # plain [0,1] pixels: normalisation folded
        assert (probs.argmax(1) == reference.argmax(1)).all()
        assert np.abs(probs - reference).max() <= 1e-4
    assert meta["formats"]["onnx"]["opset"] == 18 and meta["formats"]["safetensors"]["file"] == "model.safetensors"
    assert meta["formats"]["onnx"]["input"]["normalizationInGraph"] is True
    assert meta["preprocessing"]["mean"] == list(Predictor.load(export).preprocessing.mean)


def test_the_onnx_graph_has_a_dynamic_batch_axis_and_the_stated_opset(export: Path) -> None:
    graph = onnx.load(str(export / "serving/digits/1/model.onnx"))
    onnx.checker.check_model(graph)
    assert {o.domain: o.version for o in graph.opset_import}[""] == 18
    (inp,), (out,) = graph.graph.input, graph.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "input" and out.name == "probabilities"
    assert isinstance(dims[0], str) and dims[1:] == [3, 16, 16]
    run = portable.onnx_runner(export / "serving/digits/1/model.onnx")
    for n in (1, 7):
        probs = run(np.random.default_rng(n).random((n, 3, 16, 16), dtype=np.float32))
        assert probs.shape == (n, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_the_model_repository_and_the_model_card_sit_beside_the_export(export: Path) -> None:
    meta = json.loads((export / "model.json").read_text())
    for model, platform, inp in (("digits", "onnxruntime_onnx", "input"),
                                 ("digits-torchscript", "pytorch_libtorch", "input__0")):
        config = (export / "serving" / model / "config.pbtxt").read_text()
        assert f'name: "{model}"' in config and f'platform: "{platform}"' in config
        assert f'name: "{inp}"' in config and "dims: [ 3, 16, 16 ]" in config and "dims: [ 3 ]" in config
        assert (export / "serving" / model / "labels.txt").read_text().splitlines() == meta["classes"]
    assert (export / "serving/digits-torchscript/1/model.pt").is_file()
    card = (export / meta["modelCard"]).read_text()
    for needle in ("# digits", "## Intended use", "builtin:digits", "`0`, `1`, `2`", "val accuracy", "onnx",
                   meta["fingerprint"], "finetune-serve"):
        assert needle in card


def test_formats_leave_the_resume_fingerprint_and_the_default_export_alone(tmp_path: Path) -> None:
    plain = tiny_spec(tmp_path)
    assert plain.output.formats == ["safetensors"] and plain.output.fold_normalization is False
    assert tiny_spec(tmp_path, **{"output.formats": ALL, "output.foldNormalization": True,
                                  "output.opset": 17}).resume_fingerprint() == plain.resume_fingerprint()
    for bad, line in ((["onnx"], "must include safetensors"), (["safetensors", "onnx", "onnx"], "duplicates"),
                      (["safetensors", "tflite"], "output.formats")):
        with pytest.raises(JobFileError, match=line):
            tiny_spec(tmp_path, **{"output.formats": bad})


def _model(export: Path) -> tuple:
    p = Predictor.load(export)
    spec = parse_spec(json.loads((export / "model.json").read_text())["spec"])
    return p, spec, load_splits(spec.dataset, 0)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_corrupted_format_fails_the_parity_check_with_one_line(export: Path, tmp_path: Path, fmt: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    p, spec, splits = _model(export)
    if fmt == "onnx":
        original = portable.export_onnx

        def corrupted(graph, path, example, opset):  # the written graph's last bias is shifted
            made = original(graph, path, example, opset)
            model = onnx.load(str(path))
            last = [t for t in model.graph.initializer if t.dims == [3]][-1]
            last.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(last) + np.float32([0, 0, 5]), last.name))
            onnx.save(model, str(path))
            return made
        monkeypatch.setattr(portable, "export_onnx", corrupted)
    else:
        original = portable.export_torchscript

        def corrupted(graph, path, example):  # a graph that skips the normalisation it promised
            graph.fold = False
            try:
                return original(graph, path, example)
            finally:
                graph.fold = True
        monkeypatch.setattr(portable, "export_torchscript", corrupted)
    output = spec.output.model_copy(update={"formats": ["safetensors", fmt], "fold_normalization": True})
    with pytest.raises(portable.ParityError) as err:
        portable.write_graphs(tmp_path, p.model, p.preprocessing, output, splits.val, "digits", p.classes)
    message = str(err.value)
    assert "\n" not in message and f"output.formats: {fmt} disagrees with the PyTorch model" in message
    assert "top-1 agreement" in message and "max abs diff" in message


def test_a_format_asked_for_after_the_run_is_exported_without_training_again(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = fit(tiny_spec(out, **{"training.epochs": 1}), Reporter(), out)
    assert "formats" not in json.loads((out / "model.json").read_text())
    assert not (out / "serving").exists() and not (out / "MODEL_CARD.md").exists()
    again = fit(tiny_spec(out, **{"training.epochs": 1, "output.formats": ["safetensors", "onnx"]}), Reporter(), out)
    meta = json.loads((out / "model.json").read_text())
    assert again.sha256 == first.sha256 and again.resumed_from == 1
    assert meta["formats"]["onnx"]["parity"]["top1Agreement"] == 1.0
    assert (out / "serving/finetune/1/model.onnx").is_file()


def test_the_serving_example_parses_fits_the_crd_and_points_kserve_at_its_export() -> None:
    import yaml
    from test_examples import ROOT, _schema, structural_errors

    folder = ROOT / "examples/serving"
    job = yaml.safe_load((folder / "finetunejob.yaml").read_text())
    spec = parse_spec(job["spec"])
    assert spec.output.formats == ["safetensors", "onnx"] and spec.output.fold_normalization
    assert structural_errors(job["spec"], _schema()["properties"]["spec"]) == []
    isvc = yaml.safe_load((folder / "inferenceservice.yaml").read_text())
    runtime = yaml.safe_load((folder / "servingruntime.yaml").read_text())
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"].endswith("/" + job["metadata"]["name"])
    assert model["runtime"] == runtime["metadata"]["name"]
    assert runtime["spec"]["containers"][0]["args"][:2] == ["--model", "/mnt/models"]
