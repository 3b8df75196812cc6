"""finetune-serve as a real process, called with KServe's own REST and gRPC clients: v1 and v2 answers with the classes
`finetune-train predict` gives, 400s with a reason for bad payloads, health, metadata and metrics — and the
ONNX path running with torch made unimportable."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from PIL import Image
from trainer_util import tiny_spec

from finetune_serve import backends
from finetune_serve.batching import Batcher
from finetune_serve.images import Preprocessing
from finetune_trainer import data, export
from finetune_trainer.fit import fit
from finetune_trainer.report import Reporter

pytestmark = pytest.mark.unit
BIN = Path(sys.executable).parent
BLOCKER = "import pathlib, os\npathlib.Path(os.environ['TORCH_IMPORT_MARKER']).write_text(__name__)\n" \
          "raise ImportError('torch is blocked in this test')\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """A tiny export with an ONNX graph (normalisation not folded: the server normalises) and val images."""
    root = tmp_path_factory.mktemp("serve")
    out = root / "out"
    spec = tiny_spec(out, **{"output.formats": ["safetensors", "onnx"], "training.epochs": 3,
                             "training.precision": "fp32"})
    fit(spec, Reporter(), out, name="digits")
    images = root / "images"
    images.mkdir()
    paths = []
    splits = data.load_splits(spec.dataset, 0)
    for k, sample in enumerate(splits.val[:12]):
        paths.append(images / f"{k}.png")
        sample.load().save(paths[-1])
        (root / "heldout" / splits.classes[sample.label]).mkdir(parents=True, exist_ok=True)
        sample.load().save(root / "heldout" / splits.classes[sample.label] / f"{k}.png")
    cli = subprocess.run([str(BIN / "finetune-train"), "predict", "--model", str(out), "--json", *map(str, paths)],
                         capture_output=True, text=True, check=True)
    classes = [json.loads(line)["predictions"][0]["class"] for line in cli.stdout.splitlines()]
    return {"out": out, "paths": paths, "classes": classes, "root": root}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, root: Path, *args: str, block_torch: bool = False):
        self.port, self.marker = free_port(), root / f"torch-imported-{time.monotonic_ns()}"
        env = {**os.environ, "TORCH_IMPORT_MARKER": str(self.marker)}
        if block_torch:  # a `torch` (and torchvision) earlier on the path that records the attempt and fails
            blocked = root / "blocked"
            for name in ("torch", "torchvision"):
                (blocked / name).mkdir(parents=True, exist_ok=True)
                (blocked / name / "__init__.py").write_text(BLOCKER)
            env["PYTHONPATH"] = os.pathsep.join([str(blocked), env.get("PYTHONPATH", "")])
        self.log_path = root / f"server-{self.port}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen([str(BIN / "finetune-serve"), "--model", str(model), "--http_port",
                                      str(self.port), "--enable_grpc", "false", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"finetune-serve did not get ready:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


async def ask(url: str, protocol: str, payload, model: str = "digits"):
    client = InferenceRESTClient(RESTConfig(protocol=protocol, retries=0, timeout=30))
    try:
        return await client.infer(url, payload, model_name=model)
    finally:
        await client._client.aclose()


def v1_classes(url: str, paths: list[Path]) -> list[str]:
    body = {"instances": [{"b64": b64(p)} for p in paths]}
    return [p["class"] for p in asyncio.run(ask(url, "v1", body))["predictions"]]


def v2_image_request(paths: list[Path], binary: bool) -> InferRequest:
    # Base64 in both transports: kserve 0.21's REST decoder turns binary BYTES elements into UTF-8 strings and
    # answers 500 for raw image bytes before the model sees them (kserve/protocol/infer_type.py from_bytes).
    inp = InferInput("image", [len(paths)], "BYTES")
    values = [b64(p).encode() if binary else b64(p) for p in paths]
    inp.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return InferRequest(model_name="digits", infer_inputs=[inp], request_id="r1")


def grpc_classes(target: str, paths: list[Path]) -> list[str]:
    async def call() -> list[str]:
        client = InferenceGRPCClient(target)
        try:
            inp = InferInput("image", [len(paths)], "BYTES")
            inp.set_data_from_numpy(np.array([p.read_bytes() for p in paths], dtype=np.object_))
            response = await client.infer(InferRequest("digits", [inp], request_id="g1"))
            return [c.decode() for c in response.get_output_by_name("class").as_numpy().tolist()]
        finally:
            await client.close()
    return asyncio.run(call())


@pytest.mark.slow
def test_the_onnx_server_answers_v1_and_v2_like_predict_without_importing_torch(served) -> None:
    grpc_port = free_port()
    server = Server(served["out"], served["root"], "--max-batch-size", "4", "--enable_grpc", "true", "--grpc_port",
                    str(grpc_port), block_torch=True)
    try:
        paths, want = served["paths"], served["classes"]
        assert v1_classes(server.url, paths) == want
        assert grpc_classes(f"127.0.0.1:{grpc_port}", paths) == want, "gRPC v2, raw image bytes"
        for binary in (True, False):
            response = asyncio.run(ask(server.url, "v2", v2_image_request(paths, binary)))
            labels = [c.decode() if isinstance(c, bytes) else c for c in
                      response.get_output_by_name("class").as_numpy().tolist()]
            probs = response.get_output_by_name("probabilities").as_numpy()
            assert labels == want and probs.shape == (len(paths), 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
        pixels = np.stack([Preprocessing.from_json(json.loads((served["out"] / "model.json").read_text())
                                                   ["preprocessing"]).pixels(Image.open(p)) for p in paths])
        tensor = InferInput("input", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=False)
        response = asyncio.run(ask(server.url, "v2", InferRequest("digits", [tensor], request_id="r2")))
        assert response.get_output_by_name("probabilities").as_numpy().argmax(1).tolist() == \
            [["0", "1", "2"].index(c) for c in want]
        meta = httpx.get(f"{server.url}/v2/models/digits").json()
        assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"input": [-1, 3, 16, 16], "image": [-1]}
        assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
        assert httpx.get(f"{server.url}/v1/models/digits").json() == {"name": "digits", "ready": True}
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'request_predict_seconds_count{model_name="digits"}' in metrics
    finally:
        server.stop()
    assert not server.marker.exists(), f"the ONNX path imported {server.marker.read_text()}"
    assert " 500 " not in server.output()


BAD = [
    ("v1", {"instances": [{"b64": "not base64!"}]}, "not base64-encoded"),
    ("v1", {"instances": [{"b64": base64.b64encode(b"hello").decode()}]}, "not a readable image"),
    ("v1", {"instances": "x"}, "instances"),
    ("v1", {"instances": []}, "non-empty list"),
    ("v1", {"instances": [[[0.5] * 16] * 16]}, "is not [N,3,16,16]"),
    ("v1", {"instances": [{"url": "http://x"}]}, "b64"),
    ("v1", {"instances": [{"b64": "aGk="}], "parameters": {"top": "3"}}, "parameters.top"),
    ("v2", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 16, 16], "data": [0.5] * 7}]},
     "does not match its shape"),
    ("v2", {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.5] * 192}]},
     "is not [N,3,16,16]"),
    ("v2", {"inputs": [{"name": "input", "datatype": "INT64", "shape": [1], "data": [1]}]}, "INT64 is not served"),
    ("v2", {"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1], "data": ["aGk="]},
                       {"name": "b", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}, "expected one input"),
]


@pytest.mark.slow
def test_bad_payloads_get_a_4xx_with_the_reason_and_the_server_keeps_serving(served) -> None:
    server = Server(served["out"], served["root"], "--backend", "torch")
    try:
        for protocol, body, reason in BAD:
            path = "v1/models/digits:predict" if protocol == "v1" else "v2/models/digits/infer"
            response = httpx.post(f"{server.url}/{path}", json=body, timeout=30)
            assert 400 <= response.status_code < 500, (body, response.text)
            assert reason in response.text, (reason, response.text)
        garbage = httpx.post(f"{server.url}/v1/models/digits:predict", content=b"{not json",
                             headers={"content-type": "application/json"}, timeout=30)
        assert 400 <= garbage.status_code < 500
        with pytest.raises(httpx.HTTPStatusError, match="400"):
            asyncio.run(ask(server.url, "v1", {"instances": [{"b64": "!!"}]}))
        assert v1_classes(server.url, served["paths"]) == served["classes"], "the torch backend, same classes"
        smoke = [sys.executable, "-m", "finetune_serve.smoke", "--url", server.url, "--model", "digits",
                 "--data", str(served["root"] / "heldout"), "--batch-size", "5"]
        truth = {p.name: p.parent.name for p in (served["root"] / "heldout").rglob("*.png")}
        expected = sum(truth[p.name] == c for p, c in zip(served["paths"], served["classes"], strict=True)) / 12
        passed = subprocess.run([*smoke, "--min-accuracy", "0"], capture_output=True, text=True)
        result = json.loads(passed.stdout)
        assert passed.returncode == 0 and result["samples"] == 12 and result["accuracy"] == pytest.approx(expected)
        below = subprocess.run([*smoke, "--min-accuracy", str(min(1.0, expected + 0.01))], capture_output=True)
        assert below.returncode == (0 if expected == 1.0 else 1)
        assert server.proc.poll() is None
    finally:
        server.stop()
    assert " 500 " not in server.output()  # kserve logs each 400's traceback; none of them was a 500


def test_an_unservable_export_is_one_line_and_exit_code_2(tmp_path: Path, served) -> None:
    unreachable = subprocess.run([sys.executable, "-m", "finetune_serve.smoke", "--url", f"http://127.0.0.1:{free_port()}",
                                  "--model", "digits", "--data", str(served["root"] / "heldout")],
                                 capture_output=True, text=True)
    assert unreachable.returncode == 2 and "error" in json.loads(unreachable.stdout)
    missing = subprocess.run([str(BIN / "finetune-serve"), "--model", str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "model.json" in missing.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    meta = json.loads((served["out"] / "model.json").read_text())
    meta.pop("formats")
    (plain / "model.json").write_text(json.dumps(meta))
    with pytest.raises(backends.ExportError, match="has no onnx format"):
        backends.load_backend(plain, "onnx")


def test_the_numpy_preprocessing_matches_the_trainers_transform_within_one_grey_level() -> None:
    rng = np.random.default_rng(0)
    for (w, h), (resize, crop), mode in (((37, 23), (16, 16), "bilinear"), ((300, 200), (256, 224), "bicubic"),
                                         ((8, 8), (16, 16), "bilinear")):
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        theirs = data.Preprocessing(resize, crop, interpolation=mode)
        ours = Preprocessing(resize, crop, theirs.mean, theirs.std, mode)
        a = theirs.eval_transform()(image).numpy()
        b = ours.normalize(ours.pixels(image)[None])[0]
        assert a.shape == b.shape == (3, crop, crop)
        assert np.abs((a - b) * np.asarray(theirs.std).reshape(3, 1, 1)).max() <= 1.01 / 255
    assert backends.META_FILE == export.META_FILE


def test_concurrent_requests_share_network_calls_and_big_ones_are_chunked() -> None:
    calls: list[int] = []

    def run(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x.reshape(len(x), -1)[:, :2]

    async def scenario() -> list[np.ndarray]:
        batcher = Batcher(run, max_batch=8, max_wait_ms=200)
        singles = [np.full((1, 2), k, dtype=np.float32) for k in range(6)]
        big = np.arange(40, dtype=np.float32).reshape(20, 2)
        return await asyncio.gather(*(batcher(s) for s in singles), batcher(big))

    results = asyncio.run(scenario())
    assert [r.tolist() for r in results[:6]] == [[[k, k]] for k in range(6)]
    assert results[6].tolist() == np.arange(40).reshape(20, 2).tolist()
    assert sum(calls) == 26 and max(calls) <= 8 and len(calls) <= 5
