"""`finetune-train fetch`: dataset.uri / model.weights.uri into a verified cache, before training.

Downloads go through fsspec (s3fs, gcsfs, its own https) and huggingface_hub's HfFileSystem — no HTTP or
S3 client of our own. Each source lands in `<cache>/<key>/` (key: URI, revision, pinned digest, manifest),
built in a temp folder and published with one rename, with a source.json listing every published file's
digest; a later run (the trainer container after the init container, a retry, a resume) re-hashes those
files and reuses the entry, or discards it and fetches again. The spec handed to training has `path`s into
the cache instead of `uri`s, so the data and model code never see a URI.

Failures carry the status reasons of finetune_api.source (ChecksumMismatch, SourceNotFound, AccessDenied,
UnsafeArchive: exit 2; FetchFailed after retried network errors: exit 1). Messages name the URI, never a
credential: every value read from the Secret is masked in whatever text leaves this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from finetune_api.errors import JobFileError
from finetune_api.source import (
    ChecksumMismatch,
    RemoteSource,
    display_uri,
    is_archive,
)
from finetune_api.spec import FineTuneJobSpec, parse_spec
from finetune_trainer import remote
from finetune_trainer.archive import Limits, safe_member_path, unpack

log = logging.getLogger("finetune.fetch")

CACHE_ENV = "FINETUNE_SOURCE_CACHE"  # a cache folder shared by local jobs (default: <output>/sources)
LINEAGE_FILE = "sources.json"
ENTRY_FILE = "source.json"
SOURCE_FIELDS = ("dataset", "model.weights")
HASH_CHUNK = 4 << 20


@dataclass
class Fetched:
    field: str
    uri: str
    sha256: str
    size: int
    local: Path

    def record(self) -> dict[str, Any]:
        return {"field": self.field, "uri": self.uri, "sha256": self.sha256, "size": self.size}


def cache_root(spec: FineTuneJobSpec) -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(spec.output.path) / "sources")


def fetch_job(spec: FineTuneJobSpec, cache: Path | None = None) -> tuple[FineTuneJobSpec, list[dict[str, Any]]]:
    """Fetch every source of the spec; the spec with local paths instead of URIs, and the lineage records."""
    teacher = spec.distillation.teacher.model if spec.distillation else None
    if teacher is not None and teacher.weights.uri:
        raise JobFileError("distillation.teacher.model.weights.uri: a teacher needs its model.json beside the "
                           "weights — use teacher.fromJob, or a path on a volume")
    wire = spec.to_wire()
    records: list[dict[str, Any]] = []
    for field in SOURCE_FIELDS:
        source = spec.dataset if field == "dataset" else spec.model.weights
        if source.uri is None:
            continue
        got = fetch_source(source, field, cache or cache_root(spec))
        node = wire["dataset"] if field == "dataset" else wire["model"]["weights"]
        for name in ("uri", "sha256", "revision", "endpoint", "credentials", "manifest"):
            node.pop(name, None)
        node["path"] = str(got.local)
        records.append(got.record())
    return (parse_spec(wire) if records else spec), records


def write_lineage(output: Path, records: list[dict[str, Any]]) -> None:
    """<output>/sources.json, which the export copies into model.json (finish.py)."""
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f".{LINEAGE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(records, indent=2))
    os.replace(tmp, output / LINEAGE_FILE)


def read_lineage(output: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads((output / LINEAGE_FILE).read_text())
    except (OSError, ValueError):
        return []
    return doc if isinstance(doc, list) else []


# ---------------------------------------------------------------- one source, through the cache
def fetch_source(source: RemoteSource, field: str, cache: Path) -> Fetched:
    uri = source.uri
    assert uri is not None
    shown = display_uri(uri)
    manifest = getattr(source, "manifest", None)
    key = hashlib.sha256("\n".join([uri, source.revision or "", source.sha256 or "", manifest or ""]).encode())
    entry = cache / key.hexdigest()[:32]
    reused = _verified_entry(entry)
    if reused is not None:
        log.info("%s: %s reused from the verified cache %s", field, shown, entry)
        return _fetched(field, entry, reused)
    secrets = remote.read_secrets(source, field)
    with remote.masked(secrets):
        fs, rpath = remote.filesystem(source, secrets)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".tmp-{entry.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta = _build_entry(fs, rpath, source, field, shown, manifest, tmp)
            _publish(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: %s fetched and verified (sha256 %s, %d bytes) into %s", field, shown, meta["sha256"],
             meta["size"], entry)
    return _fetched(field, entry, meta)


def _fetched(field: str, entry: Path, meta: dict[str, Any]) -> Fetched:
    local = entry / "data" if meta["kind"] == "folder" else entry / "data" / meta["file"]
    return Fetched(field, meta["uri"], meta["sha256"], meta["size"], local)


def _build_entry(fs: Any, rpath: str, source: RemoteSource, field: str, shown: str, manifest: str | None,
                 tmp: Path) -> dict[str, Any]:
    data = tmp / "data"
    data.mkdir()
    where = f"{field}.uri {shown}"
    if manifest:
        listed = tmp / "manifest"
        _download(fs, f"{rpath.rstrip('/')}/{manifest}", listed, where)
        digest, size = _check(listed, source.sha256, f"{where} (manifest {manifest})")
        for rel, want in _parse_manifest(listed, where):
            dest = data / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            _download(fs, f"{rpath.rstrip('/')}/{rel}", dest, where)
            size += _check(dest, want, f"{where}: {rel}")[1]
        kind = "folder"
    else:
        name = Path(urlsplit(rpath).path).name or "download"
        blob = tmp / name
        _download(fs, rpath, blob, where)
        digest, size = _check(blob, source.sha256, where)
        if field == "dataset" and is_archive(rpath):
            unpack(blob, data, where, Limits.from_environment())
            blob.unlink()
            kind = "folder"
        else:
            os.replace(blob, data / name)
            kind = "file"
    files = {str(p.relative_to(data)): _sha256(p)[0] for p in sorted(data.rglob("*")) if p.is_file()}
    meta = {"uri": shown, "sha256": digest, "size": size, "kind": kind, "file": None if kind == "folder" else name,
            "files": files}
    (tmp / ENTRY_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def _publish(tmp: Path, entry: Path) -> None:
    """One rename makes the entry visible; an entry someone else published meanwhile is kept."""
    try:
        os.rename(tmp, entry)
    except OSError:
        if _verified_entry(entry) is None:
            shutil.rmtree(entry, ignore_errors=True)
            os.rename(tmp, entry)


def _verified_entry(entry: Path) -> dict[str, Any] | None:
    """The entry's metadata when every file it lists is there with its digest and nothing else is."""
    try:
        meta = json.loads((entry / ENTRY_FILE).read_text())
        data = entry / "data"
        found = {str(p.relative_to(data)) for p in data.rglob("*") if p.is_file() or p.is_symlink()}
        if found != set(meta["files"]) or any(_sha256(data / rel)[0] != want for rel, want in meta["files"].items()):
            log.warning("cache entry %s does not match its source.json: fetching again", entry)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _parse_manifest(path: Path, where: str) -> list[tuple[str, str]]:
    out = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, name = line.strip().partition(" ")
        name = name.strip().removeprefix("*")  # sha256sum's binary-mode marker
        if len(digest) != 64 or not name or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise JobFileError(f"{where}: manifest line {number} is not '<sha256>  <path>'")
        out.append((str(safe_member_path(name, f"{where} manifest")), digest.lower()))
    if not out:
        raise JobFileError(f"{where}: the manifest lists no files")
    return out


def _check(path: Path, want: str | None, where: str) -> tuple[str, int]:
    digest, size = _sha256(path)
    if want is not None and digest != want:
        raise ChecksumMismatch(f"{where}: sha256 {digest} does not match the expected {want}")
    return digest, size


def _sha256(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _download(fs: Any, rpath: str, dest: Path, where: str) -> None:
    remote.retrying(lambda: fs.get_file(rpath, str(dest)), where)



# ---------------------------------------------------------------- the CLI's share
def add_fetch_parser(sub: Any) -> None:
    p = sub.add_parser("fetch", help="fetch and verify dataset.uri / model.weights.uri into the cache (the "
                       "cluster's init container; `train` does it first too)")
    p.add_argument("-f", "--file", required=True, help="FineTuneJob manifest or bare spec (YAML)")
    p.add_argument("--cache", help=f"cache folder (default: ${CACHE_ENV}, else <spec.output.path>/sources)")


def cmd_fetch(args: Any) -> int:
    from finetune_api.spec import load_job

    job = load_job(args.file)
    _, records = fetch_job(job.spec, Path(args.cache) if args.cache else None)
    write_lineage(Path(job.spec.output.path), records)
    for r in records:
        print(f"{r['field']}: {r['uri']} sha256 {r['sha256']} ({r['size']} bytes)")
    return 0


def prepare_job(job: Any) -> Any:
    """The first step of a training run: the JobFile with its sources fetched (or reused) and lineage written."""
    spec, records = fetch_job(job.spec)
    if not records:
        return job
    write_lineage(Path(spec.output.path), records)
    return job.model_copy(update={"spec": spec})


def prepare_sweep(sweep: Any, output: str | None = None) -> Any:
    """A local FineTuneSweep: the template's sources fetched once into <output>/sources, every trial reading
    the same verified copy (on a cluster each trial FineTuneJob has its own fetch init container)."""
    template = sweep.spec.template
    root = Path(output or template.spec.output.path)
    spec, records = fetch_job(template.spec, Path(os.environ.get(CACHE_ENV) or root / "sources"))
    if records:
        template.spec = spec
        write_lineage(root, records)
    return sweep
