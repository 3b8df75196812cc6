"""Fetch throughput: a ~100 MB dataset archive through `fetch_source` from local servers (loopback).

    .venv/bin/python bench/fetch.py [--mb 100] [--repeat 3]

Servers, as in the tests (tests/unit/fetch_servers.py): a stdlib HTTPS server with a trustme CA, and moto's
S3 in server mode. The archive is an uncompressed .tar of incompressible files (a few hundred PNG-sized
members), so MB/s means bytes over the wire. Per run: download, sha256 against the pinned digest, unpack,
the digest of every published file, atomic publish — everything `finetune-train fetch` does — into a fresh
cache; then one reuse of the verified cache (re-hashing the published files, no download).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))

from fetch_servers import start_https, start_s3, stop_s3, write_secret

from finetune_api.spec import parse_spec
from finetune_trainer.fetch import fetch_source


def archive(mb: int) -> bytes:
    buf, rng = io.BytesIO(), os.urandom
    with tarfile.open(fileobj=buf, mode="w") as tar:
        member = 256 << 10
        for i in range(mb * (1 << 20) // member):
            data = rng(member)
            info = tarfile.TarInfo(f"class{i % 4}/{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run(dataset: dict, tmp: Path, repeat: int) -> tuple[list[float], float]:
    spec = parse_spec({"dataset": dataset, "output": {"path": str(tmp / "out")}})
    cold = []
    for i in range(repeat):
        cache = tmp / f"cache-{dataset['uri'][:5]}-{i}"
        t0 = time.perf_counter()
        fetch_source(spec.dataset, "dataset", cache)
        cold.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    fetch_source(spec.dataset, "dataset", cache)  # the verified cache: re-hash, no download
    return cold, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fetch-bench-"))
    data = archive(args.mb)
    digest, size_mb = hashlib.sha256(data).hexdigest(), len(data) / 1e6
    https_server, https = start_https(tmp, {"data.tar": data})
    s3_server, s3 = start_s3({"data.tar": data})
    os.environ["FINETUNE_CA_BUNDLE"] = str(https.ca_file)
    os.environ["FINETUNE_SECRETS_DIR"] = str(write_secret(tmp / "secrets", "s3", {
        "AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": s3.secret}))
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, archive {size_mb:.1f} MB "
          f"({len(data) // (256 << 10)} members), median of {args.repeat} cold fetches into a fresh cache")
    print("| source | cold fetch s (runs) | MB/s | reuse of the verified cache s |")
    print("|---|---|---|---|")
    try:
        for label, dataset in (
            ("https (trustme CA)", {"uri": f"{https.url}/data.tar", "sha256": digest}),
            ("s3 (moto server)", {"uri": f"s3://{s3.bucket}/data.tar", "sha256": digest, "endpoint": s3.endpoint,
                                  "credentials": {"secretName": "s3"}}),
        ):
            cold, warm = run(dataset, tmp, args.repeat)
            median = statistics.median(cold)
            print(f"| {label} | {median:.2f} ({', '.join(f'{c:.2f}' for c in cold)}) | {size_mb / median:.0f} | "
                  f"{warm:.2f} |")
    finally:
        https_server.shutdown()
        stop_s3(s3_server)


if __name__ == "__main__":
    main()
