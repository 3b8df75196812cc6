"""How fetch.py reaches a source: the fsspec filesystem for its URI, the credentials from the referenced Secret,
the retry loop and the mapping of library errors to status reasons.

Credentials are files of the mounted Secret (finetune_api.source.CREDENTIAL_KEYS); their values are masked
(***) in every error message and retry warning that leaves here.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from finetune_api.errors import FinetuneError
from finetune_api.source import (
    CA_BUNDLE_ENV,
    CA_BUNDLE_KEY,
    CREDENTIAL_KEYS,
    SECRETS_DIR_ENV,
    AccessDenied,
    FetchFailed,
    RemoteSource,
    SourceNotFound,
    hf_parts,
)

log = logging.getLogger("finetune.fetch")

DEFAULT_SECRETS_DIR = "/var/run/finetune/secrets"  # where the operator mounts credentials.secretName
T = TypeVar("T")


def filesystem(source: RemoteSource, secrets: dict[str, str]) -> tuple[Any, str]:
    """The fsspec filesystem for the URI (a fresh instance: credentials are never shared through fsspec's
    instance cache) and the path on it."""
    import fsspec

    uri = source.uri or ""
    parts = urlsplit(uri)
    scheme = parts.scheme
    common = {"skip_instance_cache": True}
    if scheme == "s3":
        client = {k: v for k, v in {"endpoint_url": source.endpoint, "verify": _ca_file(secrets),
                                    "region_name": secrets.get("AWS_DEFAULT_REGION")}.items() if v}
        keys = {"key": secrets.get("AWS_ACCESS_KEY_ID"), "secret": secrets.get("AWS_SECRET_ACCESS_KEY"),
                "token": secrets.get("AWS_SESSION_TOKEN")}
        fs = fsspec.filesystem("s3", client_kwargs=client, **{k: v for k, v in keys.items() if v}, **common)
        return fs, f"{parts.netloc}{parts.path}"
    if scheme == "gs":
        token = secrets.get("service-account.json#path")
        return fsspec.filesystem("gs", **({"token": token} if token else {}), **common), f"{parts.netloc}{parts.path}"
    if scheme == "hf":
        kind, repo, file = hf_parts(uri)
        prefix = {"dataset": "datasets/", "space": "spaces/", "model": ""}[kind]
        revision = f"@{quote(source.revision, safe='')}" if source.revision else ""
        fs = fsspec.filesystem("hf", **({"token": secrets["HF_TOKEN"]} if "HF_TOKEN" in secrets else {}), **common)
        return fs, f"{prefix}{repo}{revision}/{file}"
    headers = {"Authorization": f"Bearer {secrets['BEARER_TOKEN']}"} if "BEARER_TOKEN" in secrets else {}
    return fsspec.filesystem("https", ssl=_ssl_context(secrets), headers=headers, **common), uri


def _ca_file(secrets: dict[str, str]) -> str | None:
    return secrets.get(f"{CA_BUNDLE_KEY}#path") or os.environ.get(CA_BUNDLE_ENV) or None


def _ssl_context(secrets: dict[str, str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for extra in {secrets.get(f"{CA_BUNDLE_KEY}#path"), os.environ.get(CA_BUNDLE_ENV)} - {None, ""}:
        ctx.load_verify_locations(cafile=extra)
    return ctx


def read_secrets(source: RemoteSource, field: str) -> dict[str, str]:
    """The Secret's known keys as values (and `<key>#path` for the file-valued ones); {} without credentials."""
    if source.credentials is None:
        return {}
    name = source.credentials.secret_name
    folder = Path(os.environ.get(SECRETS_DIR_ENV) or DEFAULT_SECRETS_DIR) / name
    if not folder.is_dir():
        raise AccessDenied(f"{field}.credentials: Secret {name!r} is not mounted at {folder} (locally: set "
                           f"{SECRETS_DIR_ENV} to a folder holding {name}/<key> files)")
    out: dict[str, str] = {}
    for key in {k for keys in CREDENTIAL_KEYS.values() for k in keys} | {CA_BUNDLE_KEY}:
        path = folder / key
        if path.is_file():
            out[key] = path.read_text().strip()
            out[f"{key}#path"] = str(path)
    return out


_SECRET_VALUES: list[str] = []  # masked in every message and log line while a fetch with credentials runs


class masked:
    """Every secret value is replaced by *** in the message of a FinetuneError leaving the block (and in the
    retry warnings logged inside it): library errors may quote what they were given."""

    def __init__(self, secrets: dict[str, str]):
        self.values = sorted({v for k, v in secrets.items() if not k.endswith("#path") and len(v) >= 4}, key=len,
                             reverse=True)

    def __enter__(self) -> masked:
        _SECRET_VALUES[:] = self.values
        return self

    def __exit__(self, kind, err, tb) -> None:
        _SECRET_VALUES.clear()
        if isinstance(err, FinetuneError) and self.values:
            err.args = (_mask(str(err), self.values),)


def _mask(text: str, values: list[str]) -> str:
    for value in values:
        text = text.replace(value, "***")
    return text


def retrying(op: Callable[[], T], where: str) -> T:
    """Permanent errors at once; network errors retried with exponential backoff, then FetchFailed."""
    attempts = max(1, int(os.environ.get("FINETUNE_FETCH_ATTEMPTS", "4")))
    delay = float(os.environ.get("FINETUNE_FETCH_BACKOFF_SECONDS", "1"))
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except Exception as err:
            if isinstance(err, OSError) and str(err.filename or "").startswith("/"):
                raise  # the local side (the cache folder unwritable, the disk full): the CLI names the path
            permanent = classify(err, where)
            if permanent is not None:
                raise permanent from None
            if attempt == attempts:
                raise FetchFailed(f"{where}: gave up after {attempts} attempts: {_short(err)}") from None
            log.warning("%s: attempt %d of %d failed (%s); retrying in %.0f s", where, attempt, attempts,
                        _short(err), delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


_BY_NAME = {
    "GatedRepoError": AccessDenied, "RepositoryNotFoundError": SourceNotFound,
    "RevisionNotFoundError": SourceNotFound, "EntryNotFoundError": SourceNotFound,
    "RemoteEntryNotFoundError": SourceNotFound, "NoCredentialsError": AccessDenied,
    "SSLCertVerificationError": AccessDenied, "ClientConnectorCertificateError": AccessDenied,
}
_WORDS = {SourceNotFound: "no such object (or bucket, repository, revision)",
          AccessDenied: "access denied: the credentials are missing, wrong or not allowed to read it"}


def classify(err: BaseException, where: str) -> FinetuneError | None:
    """The permanent fetch error `err` means, or None for one worth retrying (network, server busy)."""
    if isinstance(err, FinetuneError):
        return err
    for e in _chain(err):
        kind = next((_BY_NAME[c.__name__] for c in type(e).__mro__ if c.__name__ in _BY_NAME), None)
        status = getattr(e, "status", None) or getattr(e, "code", None)
        if kind is None and isinstance(e, FileNotFoundError):
            kind = SourceNotFound
        elif kind is None and (isinstance(e, PermissionError) or status in (401, 403)
                               or str(e).startswith("Forbidden")):
            kind = AccessDenied
        elif kind is None and isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
            kind = SourceNotFound
        if kind is not None and "Certificate" in type(e).__name__:
            return kind(f"{where}: its TLS certificate is not trusted (add the CA as the Secret's {CA_BUNDLE_KEY}, "
                        f"or locally {CA_BUNDLE_ENV})")
        if kind is not None:
            detail = f" (HTTP {status})" if isinstance(status, int) and status >= 400 else ""
            return kind(f"{where}: {_WORDS[kind]}{detail}")
    return None


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    node: BaseException | None = err
    while node is not None and node not in out and len(out) < 8:
        out.append(node)
        node = node.__cause__ or node.__context__
    return out


def _short(err: BaseException) -> str:
    text = _mask(str(err).splitlines()[0], _SECRET_VALUES) if str(err) else ""
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__
