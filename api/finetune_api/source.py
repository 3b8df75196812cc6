"""dataset.uri / model.weights.uri: data and weights fetched from where users keep them, and verified.

The fields (mixed into Dataset and Weights), the credentials reference, the fetch errors and their status
reasons. Like the rest of the spec: no torch, no kubernetes, no network here — the trainer's fetch.py does
the fetching, the operator reads the reasons back from the init container's termination message.

Credentials are never a value in the spec: `credentials.secretName` names a Secret whose keys the fetcher
reads as files (CREDENTIAL_KEYS). On a cluster the operator mounts it into the fetch init container only;
locally the same layout is read from `$FINETUNE_SECRETS_DIR/<secretName>/`.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from finetune_api.base import MAX_PATH, _Model, _no_parent_segments
from finetune_api.errors import JobFileError, TrainingError

SCHEMES = ("s3", "gs", "https", "hf")
MAX_URI = 2048
# An authority without userinfo ('@'): a password in a URI would land in status, events and logs.
URI_PATTERN = r"^(s3|gs|hf|https)://[^/@\s?#]+(/[^\s]*)?$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
ENDPOINT_PATTERN = r"^https?://[^/@\s?#]+(/[^\s?#]*)?$"
# DNS-1123 subdomain: a Secret's name.
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"
# The Secret's keys the fetcher reads (each a file in the mounted Secret); any other key is ignored.
CREDENTIAL_KEYS = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"),
    "gs": ("service-account.json",),
    "hf": ("HF_TOKEN",),
    "https": ("BEARER_TOKEN",),
}
CA_BUNDLE_KEY = "ca.crt"  # any scheme: PEM certificates to trust besides the system's (https, an s3 endpoint)
SECRETS_DIR_ENV = "FINETUNE_SECRETS_DIR"
CA_BUNDLE_ENV = "FINETUNE_CA_BUNDLE"  # a PEM file to trust as well (local runs, tests)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


class Credentials(_Model):
    secret_name: str = Field(
        ..., min_length=1, max_length=253, pattern=SECRET_NAME_PATTERN,
        description="a Secret in the job's namespace; its keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_SESSION_TOKEN, AWS_DEFAULT_REGION (s3), service-account.json (gs), HF_TOKEN (hf), BEARER_TOKEN "
        "(https) and ca.crt (a CA to trust) are mounted into the fetch init container only",
    )


class RemoteSource(_Model):
    """The fields a fetched source adds beside its local `path` (exactly one of the two is set)."""

    uri: str | None = Field(
        None, max_length=MAX_URI, pattern=URI_PATTERN,
        description="fetched before training: s3://bucket/key, gs://bucket/key, https://host/path, "
        "hf://[datasets/]org/name/path (no user:password@ — use credentials)",
    )
    sha256: str | None = Field(
        None, pattern=SHA256_PATTERN,
        description="hex digest the fetched file (or archive, or manifest) must have: a mismatch fails the job "
        "with ChecksumMismatch before training",
    )
    revision: str | None = Field(
        None, max_length=255, pattern=REVISION_PATTERN, description="hf:// only: a branch, tag or commit")
    endpoint: str | None = Field(
        None, max_length=MAX_URI, pattern=ENDPOINT_PATTERN,
        description="s3:// only: an S3-compatible endpoint URL (MinIO, Ceph …) instead of AWS",
    )
    credentials: Credentials | None = Field(None, description="a Secret referenced by name, never values")

    @field_validator("uri")
    @classmethod
    def _uri_names_an_object(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if any(ord(c) < 32 for c in value):
            raise ValueError("must not contain control characters")
        parts = urlsplit(value)
        if not parts.path.strip("/"):
            raise ValueError(f"{parts.scheme}:// needs a bucket or host and an object path")
        if parts.scheme == "hf" and (hf_parts(value)[1].count("/") != 1 or not hf_parts(value)[2]):
            raise ValueError("hf:// needs a repository (org/name) and a file path in it")
        _no_parent_segments(parts.path)
        return value

    def check_source_fields(self, where: str) -> None:
        """The cross-field rules the model validators of Dataset and Weights call."""
        if self.uri is None:
            for name in ("sha256", "revision", "endpoint", "credentials"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{where}.{_camel(name)} needs {where}.uri")
            return
        scheme = urlsplit(self.uri).scheme
        if self.revision is not None and scheme != "hf":
            raise ValueError(f"{where}.revision is only for hf:// URIs")
        if self.endpoint is not None and scheme != "s3":
            raise ValueError(f"{where}.endpoint is only for s3:// URIs")


# What a fetched source adds to the resume fingerprint: what it is (uri, digest, revision), not how it is
# reached; unset, nothing — so a spec without uri keeps the fingerprint it had before these fields existed.
_ADDED = ("uri", "sha256", "revision", "endpoint", "credentials", "manifest")
_HOW_REACHED = ("endpoint", "credentials")


def fingerprint_fields(source: RemoteSource) -> set[str]:
    """The field names of a Dataset or Weights that go into the resume fingerprint."""
    return {name for name in type(source).model_fields
            if name not in _ADDED or (name not in _HOW_REACHED and getattr(source, name) is not None)}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def hf_parts(uri: str) -> tuple[str, str, str]:
    """hf://[datasets/|models/|spaces/]org/name/file → (repo type, repo id, file path in the repo)."""
    path = uri.removeprefix("hf://")
    kind = "model"
    for prefix, name in (("datasets/", "dataset"), ("models/", "model"), ("spaces/", "space")):
        if path.startswith(prefix):
            kind, path = name, path.removeprefix(prefix)
    segments = path.split("/")
    return kind, "/".join(segments[:2]), "/".join(segments[2:])


def display_uri(uri: str) -> str:
    """The URI as messages, events, status and model.json show it: a query string (a presigned URL's
    signature) is cut off."""
    return re.sub(r"[?#].*$", "?…", uri) if re.search(r"[?#]", uri) else uri


def is_archive(uri: str) -> bool:
    return urlsplit(uri).path.lower().endswith(ARCHIVE_SUFFIXES)


class DatasetSource(RemoteSource):
    """A dataset is an archive (unpacked to an ImageFolder) or a folder of files listed in a manifest."""

    manifest: str | None = Field(
        None, min_length=1, max_length=MAX_PATH,
        description="a file in the folder uri names, in sha256sum format ('<hex>  <path>' per line): exactly "
        "those files are fetched and each is verified; sha256 then pins the manifest itself",
    )

    def check_dataset_source(self) -> None:
        self.check_source_fields("dataset")
        _no_parent_segments(self.manifest)
        if self.manifest is not None and (self.uri is None or self.manifest.startswith("/")):
            raise ValueError("dataset.manifest needs dataset.uri and is a path relative to it")
        if self.uri is not None and self.manifest is None and not is_archive(self.uri):
            raise ValueError(f"dataset.uri must name an archive ({', '.join(ARCHIVE_SUFFIXES)}) or come with "
                             "dataset.manifest")


# ---------------------------------------------------------------- failures, by status reason
class ChecksumMismatch(JobFileError):
    """The fetched bytes are not the ones sha256 (or the manifest) names: exit 2, never retried."""

    reason = "ChecksumMismatch"


class SourceNotFound(JobFileError):
    """No object at the URI (bucket, key, repository, revision or file): exit 2."""

    reason = "SourceNotFound"


class AccessDenied(JobFileError):
    """The credentials are missing, wrong or not allowed to read it (or its TLS certificate is not trusted)."""

    reason = "AccessDenied"


class UnsafeArchive(JobFileError):
    """An archive member would land outside its folder, is a link or device, or the archive is too large."""

    reason = "UnsafeArchive"


class FetchFailed(TrainingError):
    """Network errors outlasted the retries: exit 1, the Job's backoffLimit retries the pod."""

    reason = "FetchFailed"


FETCH_ERRORS = (ChecksumMismatch, SourceNotFound, AccessDenied, UnsafeArchive, FetchFailed)
# The termination message is "<ErrorClass>: <message>" (cli._failed): the class name is the reason.
FETCH_REASONS = tuple(e.reason for e in FETCH_ERRORS)
PERMANENT_FETCH_REASONS = tuple(e.reason for e in FETCH_ERRORS if issubclass(e, JobFileError))
