"""Request images → the network's input, in numpy and PIL: the trainer's eval transform without torch.

Resize (shorter side, antialiased), center crop, [0,1] scaling and the channel order follow torchvision's
Resize / CenterCrop / ToDtype(scale=True); PIL's and torch's resampling can differ by one grey level at
an edge, which tests/unit/test_serve.py bounds. An image already at the crop size passes through untouched.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

MAX_IMAGE_BYTES = 32 << 20
MAX_PIXELS = 64_000_000  # a decompression bomb is refused before PIL expands it
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
              "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


class BadImage(ValueError):
    """A request image that cannot be used; the message names the instance."""


@dataclass(frozen=True)
class Preprocessing:
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_json(cls, p: dict) -> Preprocessing:
        return cls(int(p["resize"]), int(p["crop"]), tuple(p["mean"]), tuple(p["std"]),
                   p.get("interpolation", "bilinear"))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """[3,crop,crop] float32 in [0,1]."""
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.resize:
            other = int(self.resize * long / short)  # torchvision's rounding of the long side
            size = (self.resize, other) if w <= h else (other, self.resize)
            image = image.resize(size, RESAMPLING.get(self.interpolation, Image.Resampling.BILINEAR))
        w, h = image.size
        left, top = round((w - self.crop) / 2.0), round((h - self.crop) / 2.0)  # torchvision's CenterCrop
        image = image.crop((left, top, left + self.crop, top + self.crop))
        return (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1).copy()

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return ((pixels - mean) / std).astype(np.float32)


def image_bytes(value: object, where: str) -> bytes:
    """Raw image bytes from a request value: bytes as sent, or a base64 string (`{"b64": ...}` in v1)."""
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise BadImage(f"{where}: an image object must be {{\"b64\": \"<base64>\"}}, got keys {sorted(value)}")
        value = value["b64"]
    if isinstance(value, bytes) and value.startswith(MAGIC):
        data = value
    elif isinstance(value, str | bytes):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadImage(f"{where}: not base64-encoded image bytes") from None
    else:
        raise BadImage(f"{where}: expected a base64 image string, got {type(value).__name__}")
    if not data:
        raise BadImage(f"{where}: empty image")
    if len(data) > MAX_IMAGE_BYTES:
        raise BadImage(f"{where}: image of {len(data)} bytes is over the {MAX_IMAGE_BYTES} byte limit")
    return data


def decode(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise BadImage(f"{where}: image of {im.width}x{im.height} pixels is over the {MAX_PIXELS} limit")
            return im.convert("RGB")
    except BadImage:
        raise
    except Exception:  # PIL raises many types for crafted data (struct.error, ZeroDivisionError, …): all a 400
        raise BadImage(f"{where}: not a readable image (PNG, JPEG, ...)") from None
