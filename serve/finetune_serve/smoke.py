"""Smoke test of a served model: labelled images → the endpoint over Open Inference Protocol v2 → accuracy.

    python -m finetune_serve.smoke --url http://HOST --model NAME --data FOLDER [--min-accuracy 0.9]
                                   [--samples 200] [--batch-size 16]

FOLDER is an ImageFolder (<class>/<image>) whose folder names are classes of the model. The images go as
base64 BYTES through KServe's own REST client, exactly as a user's request would. Prints one JSON line
({"accuracy", "samples", "correct", "perClass", "minAccuracy", "passed"}); exit 0 when accuracy reaches
--min-accuracy, 1 when it does not, 2 when the test cannot run (no images, endpoint errors).
No torch: this runs in the serve image (the hand-off's smoke-test Job).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
EXIT_PASSED, EXIT_BELOW, EXIT_CANNOT_RUN = 0, 1, 2


class SmokeError(Exception):
    """The smoke test cannot run; one line."""


def labelled_images(folder: Path, samples: int, seed: int = 0) -> list[tuple[Path, str]]:
    if not folder.is_dir():
        raise SmokeError(f"--data: {folder} is not a directory")
    found = [(p, d.name) for d in sorted(folder.iterdir()) if d.is_dir()
             for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise SmokeError(f"--data: no images in {folder}/<class>/")
    random.Random(seed).shuffle(found)  # a sample across classes, the same one every run
    return found[:samples]


async def classify(url: str, model: str, paths: list[Path], batch_size: int, timeout: float) -> list[str]:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=timeout))
    labels: list[str] = []
    try:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            image = InferInput("image", [len(chunk)], "BYTES")
            image.set_data_from_numpy(np.array([base64.b64encode(p.read_bytes()) for p in chunk], dtype=np.object_),
                                      binary_data=True)
            response = await client.infer(url, InferRequest(model, [image]), model_name=model)
            labels += [c.decode() if isinstance(c, bytes) else str(c)
                       for c in response.get_output_by_name("class").as_numpy().tolist()]
    finally:
        await client._client.aclose()
    return labels


def score(truth: list[str], predicted: list[str], min_accuracy: float) -> dict[str, Any]:
    correct = sum(t == p for t, p in zip(truth, predicted, strict=True))
    per_class = {c: round(sum(t == p for t, p in zip(truth, predicted, strict=True) if t == c) /
                          truth.count(c), 6) for c in sorted(set(truth))}
    accuracy = correct / len(truth)
    return {"accuracy": accuracy, "samples": len(truth), "correct": correct, "perClass": per_class,
            "minAccuracy": min_accuracy, "passed": accuracy >= min_accuracy}


def run(args: argparse.Namespace) -> dict[str, Any]:
    images = labelled_images(Path(args.data), args.samples, args.seed)
    try:
        predicted = asyncio.run(classify(args.url, args.model, [p for p, _ in images], args.batch_size,
                                         args.timeout))
    except Exception as err:  # any transport or HTTP error: the endpoint, not the model, failed the test
        raise SmokeError(f"{args.url}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") \
            from None
    return score([c for _, c in images], predicted, args.min_accuracy)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune_serve.smoke", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="base URL of the server, e.g. http://digits.default.svc")
    p.add_argument("--model", required=True, help="model name on the endpoint")
    p.add_argument("--data", required=True, help="ImageFolder of held-out images (<class>/<image>)")
    p.add_argument("--min-accuracy", type=float, default=0.0)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    try:
        if not 0.0 <= args.min_accuracy <= 1.0 or args.samples < 1 or args.batch_size < 1:
            raise SmokeError("--min-accuracy must be in [0, 1], --samples and --batch-size at least 1")
        result = run(args)
    except SmokeError as err:
        print(json.dumps({"error": str(err)}))
        print(f"smoke test: {err}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    print(json.dumps(result))
    return EXIT_PASSED if result["passed"] else EXIT_BELOW


if __name__ == "__main__":
    sys.exit(main())
