"""The export as a kserve.Model: v1 `instances` and Open Inference Protocol v2 requests → class probabilities.

v1 (`POST /v1/models/<name>:predict`): `{"instances": [{"b64": "<image>"} | "<base64 image>" | [[[...]]]]}`
(images in any format PIL reads, or [3,H,W] pixel lists in [0,1]); answers
`{"predictions": [{"class", "probability", "top": [{"class", "probability"}, ...]}]}`.
v2 (`POST /v2/models/<name>/infer`): one input, either FP32 [N,3,H,W] pixels in [0,1] or BYTES [N] images
(raw bytes with the binary extension, base64 strings in JSON); answers FP32 `probabilities` [N,C] and BYTES
`class` [N]. `parameters.top` (v1 body or v2 request) sets how many classes `top` lists (default 5).
Every malformed request raises kserve's InvalidInput: a 400 with the reason, never a 500.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InvalidInput

from finetune_serve.backends import Backend, Export
from finetune_serve.batching import Batcher
from finetune_serve.images import BadImage, decode, image_bytes

MAX_INSTANCES = 1024
DEFAULT_TOP = 5


@dataclass
class Decoded:
    """A parsed request on its way to predict(); not a mapping, so kserve's payload checks pass it by."""

    pixels: np.ndarray
    v2: InferRequest | None
    top: int

    def __contains__(self, key: object) -> bool:
        return False


class ExportModel(Model):
    def __init__(self, name: str, export: Export, backend: Backend, max_batch: int = 32, max_wait_ms: float = 2.0):
        super().__init__(name)
        self.export, self.backend = export, backend
        self.classes = export.classes
        self.crop = backend.prep.crop
        self.batcher = Batcher(backend.run, max_batch, max_wait_ms)

    def load(self) -> bool:
        self.backend.run(np.zeros((1, 3, self.crop, self.crop), dtype=np.float32))  # warm: first request not slow
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        return [{"name": "input", "datatype": "FP32", "shape": [-1, 3, self.crop, self.crop]},
                {"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.classes)]},
                {"name": "class", "datatype": "BYTES", "shape": [-1]}]

    async def preprocess(self, payload: dict | InferRequest, headers: dict[str, str] | None = None) -> Decoded:
        try:
            if isinstance(payload, InferRequest):
                top = _top(payload.parameters)
                return Decoded(self._v2_pixels(payload), payload, top)
            if not isinstance(payload, dict):
                raise InvalidInput("the request body must be a JSON object with \"instances\"")
            top = _top(payload.get("parameters"))
            return Decoded(self._v1_pixels(payload), None, top)
        except BadImage as err:
            raise InvalidInput(str(err)) from None

    async def predict(self, payload: Decoded, headers: dict[str, str] | None = None) -> dict | InferResponse:
        probs = await self.batcher(payload.pixels)
        best = probs.argmax(axis=1)
        if payload.v2 is not None:
            labels = np.array([self.classes[i].encode() for i in best], dtype=np.object_)
            outputs = [InferOutput("probabilities", list(probs.shape), "FP32"),
                       InferOutput("class", [len(best)], "BYTES")]
            binary = payload.v2.use_binary_outputs
            outputs[0].set_data_from_numpy(probs.astype(np.float32), binary_data=binary)
            outputs[1].set_data_from_numpy(labels, binary_data=binary)
            return InferResponse(payload.v2.id or str(uuid.uuid4()), self.name, outputs, use_binary_outputs=binary)
        top = min(payload.top, len(self.classes))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
        return {"predictions": [
            {"class": self.classes[b], "probability": float(p[b]),
             "top": [{"class": self.classes[i], "probability": float(p[i])} for i in o]}
            for b, p, o in zip(best, probs, order, strict=True)]}

    def _v1_pixels(self, body: dict[str, Any]) -> np.ndarray:
        instances = body.get("instances")
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("v1: \"instances\" must be a non-empty list of images ({\"b64\": ...}) or "
                               f"[3,{self.crop},{self.crop}] pixel lists")
        _limit(len(instances))
        if all(isinstance(i, list) for i in instances):
            return self._tensor(_floats(instances, "v1 instances"), "v1 instances")
        if any(isinstance(i, list) for i in instances):
            raise InvalidInput("v1: \"instances\" mixes images and pixel lists")
        return self._images([image_bytes(v, f"instances[{k}]") for k, v in enumerate(instances)])

    def _v2_pixels(self, request: InferRequest) -> np.ndarray:
        if len(request.inputs) != 1:
            raise InvalidInput(f"v2: expected one input (\"input\" FP32 [N,3,{self.crop},{self.crop}] or \"image\" "
                               f"BYTES [N]), got {len(request.inputs)}")
        (inp,) = request.inputs
        if inp.datatype == "BYTES":
            values = _as_numpy(inp).reshape(-1)
            _limit(len(values))
            if not len(values):
                raise InvalidInput("v2: the BYTES input holds no image")
            return self._images([image_bytes(v, f"inputs[0][{k}]") for k, v in enumerate(values)])
        if inp.datatype not in ("FP32", "FP64", "FP16"):
            raise InvalidInput(f"v2: input datatype {inp.datatype} is not served: send FP32 pixels or BYTES images")
        return self._tensor(_as_numpy(inp).astype(np.float32), f"v2 input {inp.name!r}")

    def _tensor(self, x: np.ndarray, where: str) -> np.ndarray:
        want = (3, self.crop, self.crop)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != want or not len(x):
            raise InvalidInput(f"{where}: shape {list(x.shape)} is not [N,3,{self.crop},{self.crop}]")
        _limit(len(x))
        if not np.isfinite(x).all():
            raise InvalidInput(f"{where}: holds NaN or infinite values")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _images(self, blobs: list[bytes]) -> np.ndarray:
        return self.backend.images([decode(b, f"image {k}") for k, b in enumerate(blobs)]).astype(np.float32)


def _as_numpy(inp) -> np.ndarray:
    try:
        return inp.as_numpy()
    except InvalidInput:
        raise
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"v2: input {inp.name!r} does not match its shape {inp.shape} ({err})") from None


def _floats(value: list, where: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError):
        raise InvalidInput(f"{where}: pixel lists must be rectangular numbers") from None


def _limit(n: int) -> None:
    if n > MAX_INSTANCES:
        raise InvalidInput(f"{n} instances in one request; at most {MAX_INSTANCES}")


def _top(parameters: Any) -> int:
    value = (parameters or {}).get("top", DEFAULT_TOP) if isinstance(parameters, dict) else DEFAULT_TOP
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"parameters.top must be a positive integer, got {value!r}")
    return value
