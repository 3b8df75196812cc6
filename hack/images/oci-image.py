#!/usr/bin/env python3
"""Write a one-layer OCI image archive from local files (Python standard library only, no registry).

    hack/images/oci-image.py --name localhost/finetune-pause:3.10 --output pause.tar \\
        --file /pause=build/pause:0755 --entrypoint /pause --user 65535:65535
    ctr -n k8s.io images import pause.tar        # or: docker load -i pause.tar (Docker >= 25)

The archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...): one uncompressed layer
holding the given files (owner root, mtime 0: the same inputs give the same digests), an image config
(entrypoint, cmd, user, env) and a manifest. index.json names the image twice, as containerd's importer
reads it (`io.containerd.image.name`, the full reference) and as the OCI spec does
(`org.opencontainers.image.ref.name`, the tag).

Used for the pause image of the real-kubelet node (hack/testenv/kubelet_node.py, Kubernetes'
build/pause/linux/pause.c compiled statically: see hack/images/build-pause.sh).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _dirs(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def layer_tar(files: list[tuple[str, Path, int]]) -> bytes:
    """An uncompressed tar of `files` ((path in image, source, mode)), parents created, deterministic."""
    buf = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dest, src, mode in sorted(files):
            for d in _dirs(dest):
                if d not in seen:
                    seen.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(info)
            data = src.read_bytes()
            info = tarfile.TarInfo(dest.strip("/"))
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def build(
    name: str,
    files: list[tuple[str, Path, int]],
    entrypoint: list[str],
    cmd: list[str] | None = None,
    user: str = "",
    env: list[str] | None = None,
    arch: str = "amd64",
) -> bytes:
    """The OCI layout archive (bytes) of a one-layer image named `name`."""
    blobs: dict[str, bytes] = {}
    layer = layer_tar(files)
    layer_desc = {"mediaType": OCI_LAYER, **_blob(blobs, layer)}
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "Cmd": cmd or [],
            "User": user,
            "Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},  # uncompressed: digest == diff_id
        "history": [{"created_by": "hack/images/oci-image.py", "created": "1970-01-01T00:00:00Z"}],
        "created": "1970-01-01T00:00:00Z",
    }
    config_desc = {"mediaType": OCI_CONFIG, **_blob(blobs, json.dumps(config, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_desc, "layers": [layer_desc]}
    manifest_desc = {"mediaType": OCI_MANIFEST, **_blob(blobs, json.dumps(manifest, sort_keys=True).encode())}
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    manifest_desc["annotations"] = {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag}
    manifest_desc["platform"] = {"architecture": arch, "os": "linux"}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [manifest_desc]}

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index, sort_keys=True).encode())
        for digest, data in sorted(blobs.items()):
            add(f"blobs/sha256/{digest.split(':', 1)[1]}", data)
    return out.getvalue()


def _file_arg(spec: str) -> tuple[str, Path, int]:
    dest, _, rest = spec.partition("=")
    src, _, mode = rest.partition(":")
    if not dest.startswith("/") or not src:
        raise argparse.ArgumentTypeError(f"--file wants /path/in/image=source[:mode], got {spec!r}")
    return dest, Path(src), int(mode or "0644", 8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="image reference, e.g. localhost/finetune-pause:3.10")
    ap.add_argument("--output", required=True, type=Path, help="archive to write")
    ap.add_argument("--file", action="append", type=_file_arg, required=True, help="/dest=src[:octal mode]")
    ap.add_argument("--entrypoint", action="append", default=[], help="repeat for each argument")
    ap.add_argument("--cmd", action="append", default=[], help="repeat for each argument")
    ap.add_argument("--user", default="", help="uid[:gid] the image runs as")
    args = ap.parse_args(argv)
    data = build(args.name, args.file, args.entrypoint, args.cmd, args.user)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.output)
    print(f"{args.name} -> {args.output} ({len(data)} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
