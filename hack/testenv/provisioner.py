#!/usr/bin/env python3
"""A local-path volume provisioner for the single-node local cluster (Python standard library only).

StorageClass `standard` (the default; provisioner `finetune.dev/local-path`, Immediate binding): every PVC
of that class gets a directory `<root>/<namespace>/<claim>` (mode 0777: pods run as any uid, and a
hostPath volume gets no fsGroup ownership change) and a hostPath PV bound to the claim; a Released PV is
deleted together with its directory. This is what rancher's local-path-provisioner does on single-node
clusters; kube-controller-manager's own `--enable-hostpath-provisioner` makes its directories 0750 root,
which non-root trainers cannot write. Tests find a claim's files on the host through the PV's hostPath.

    provisioner.py --server URL --ca CA --cert CRT --key KEY --root DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STORAGE_CLASS = "standard"
PROVISIONER = "finetune.dev/local-path"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"


class Api:
    def __init__(self, server: str, ca: str, cert: str, key: str):
        self.server = server.rstrip("/")
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.load_cert_chain(cert, key)

    def call(self, method: str, path: str, body: dict | None = None, ok: tuple[int, ...] = (200, 201)) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=10) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return {}
            raise


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} provisioner: {msg}", flush=True)


def ensure_class(api: Api) -> None:
    sc = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
          "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
          "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"}  # fmt: skip
    api.call("POST", "/apis/storage.k8s.io/v1/storageclasses", sc, ok=(200, 201, 409))


def provision(api: Api, root: Path, pvc: dict) -> None:
    md, spec = pvc["metadata"], pvc["spec"]
    path = root / md["namespace"] / md["name"]
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    size = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": md["namespace"], "name": md["name"],
             "uid": md["uid"]}  # fmt: skip
    pv = {"apiVersion": "v1", "kind": "PersistentVolume",
          "metadata": {"name": f"pvc-{md['uid']}", "annotations": {PROVISIONED_BY: PROVISIONER}},
          "spec": {"capacity": {"storage": size}, "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                   "persistentVolumeReclaimPolicy": "Delete", "storageClassName": spec["storageClassName"],
                   "volumeMode": spec.get("volumeMode", "Filesystem"),
                   "hostPath": {"path": str(path), "type": "Directory"}, "claimRef": claim}}  # fmt: skip
    api.call("POST", "/api/v1/persistentvolumes", pv, ok=(200, 201, 409))
    log(f"PV {pv['metadata']['name']} for {md['namespace']}/{md['name']} at {path}")


def tick(api: Api, root: Path) -> None:
    classes = {c["metadata"]["name"] for c in api.call("GET", "/apis/storage.k8s.io/v1/storageclasses")["items"]
               if c.get("provisioner") == PROVISIONER}  # fmt: skip
    for pvc in api.call("GET", "/api/v1/persistentvolumeclaims")["items"]:
        spec, md = pvc["spec"], pvc["metadata"]
        if not spec.get("volumeName") and spec.get("storageClassName") in classes and not md.get("deletionTimestamp"):
            provision(api, root, pvc)
    for pv in api.call("GET", "/api/v1/persistentvolumes")["items"]:
        ours = (pv["metadata"].get("annotations") or {}).get(PROVISIONED_BY) == PROVISIONER
        if ours and pv.get("status", {}).get("phase") == "Released":
            api.call("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}", ok=(200, 202, 404))
            path = Path(pv["spec"]["hostPath"]["path"])
            if root in path.parents:
                shutil.rmtree(path, ignore_errors=True)
            log(f"deleted released PV {pv['metadata']['name']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("--server", "--ca", "--cert", "--key", "--root"):
        ap.add_argument(flag, required=True)
    args = ap.parse_args(argv)
    api, root = Api(args.server, args.ca, args.cert, args.key), Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ensure_class(api)
    (root / ".ready").touch()
    while True:
        try:
            tick(api, root)
        except (OSError, urllib.error.URLError, KeyError, ValueError) as e:  # the API restarts in fault tests
            log(f"{type(e).__name__}: {e}")
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
