"""Unpacking a fetched dataset archive (.tar, .tar.gz, .tgz, .zip) into a fresh folder, refusing anything hostile.

An archive comes from outside: every member is checked before a byte of it is written — no absolute
names, no `..`, no control characters, no links (a link is how a later member escapes the folder), no
devices or FIFOs, no duplicate names — and the member count and the bytes actually written (not the sizes
the archive declares) are capped. Files are created with O_EXCL | O_NOFOLLOW under a folder this process
just made, so nothing lands outside it; on any refusal the caller discards the whole folder.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from finetune_api.source import UnsafeArchive

CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Caps on what one archive may unpack to (FINETUNE_ARCHIVE_MAX_FILES / _MAX_BYTES override them)."""

    max_files: int = 2_000_000
    max_bytes: int = 1 << 40

    @classmethod
    def from_environment(cls) -> Limits:
        return cls(int(os.environ.get("FINETUNE_ARCHIVE_MAX_FILES", cls.max_files)),
                   int(os.environ.get("FINETUNE_ARCHIVE_MAX_BYTES", cls.max_bytes)))


def safe_member_path(name: str, where: str) -> PurePosixPath:
    """The member's relative path, or UnsafeArchive naming why it may not be written."""
    if any(ord(c) < 32 for c in name):
        raise UnsafeArchive(f"{where}: member {name!r} has control characters in its name")
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith(("/", "\\")) or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchive(f"{where}: member {name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeArchive(f"{where}: member {name!r} has a '..' segment (it would land outside the folder)")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        raise UnsafeArchive(f"{where}: member {name!r} has an empty name")
    return PurePosixPath(*parts)


def unpack(archive: Path, target: Path, where: str, limits: Limits | None = None) -> int:
    """Unpack `archive` into the empty folder `target`; returns the number of files written."""
    limits = limits or Limits.from_environment()
    with open(archive, "rb") as f:
        is_zip = zipfile.is_zipfile(f)
    members = _zip_members(archive, where) if is_zip else _tar_members(archive, where)
    files = written = 0
    seen: set[PurePosixPath] = set()
    for count, (name, kind, stream) in enumerate(members, start=1):
        if count > limits.max_files:
            raise UnsafeArchive(f"{where}: more than {limits.max_files} members (the limit)")
        rel = safe_member_path(name, where)
        if kind == "dir":
            _make_dirs(target, rel)
            continue
        if rel in seen:
            raise UnsafeArchive(f"{where}: member {name!r} appears twice")
        seen.add(rel)
        _make_dirs(target, rel.parent)
        written = _write_file(target / rel, stream, written, limits, where)
        files += 1
    return files


def _make_dirs(target: Path, rel: PurePosixPath) -> None:
    node = target
    for part in rel.parts:
        node = node / part
        try:
            os.mkdir(node, 0o755)
        except FileExistsError:
            if node.is_symlink() or not node.is_dir():  # only this function makes folders here: a file is in the way
                raise UnsafeArchive(f"a member's folder {part!r} is also a file in the archive") from None


def _write_file(dest: Path, stream: BinaryIO, written: int, limits: Limits, where: str) -> int:
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise UnsafeArchive(f"{where}: member {dest.name!r} clashes with a folder of the same name") from None
    with os.fdopen(fd, "wb") as out:
        while chunk := stream.read(CHUNK):
            written += len(chunk)
            if written > limits.max_bytes:  # counted as written: declared sizes can lie (a zip bomb's do)
                raise UnsafeArchive(f"{where}: unpacks to more than {limits.max_bytes} bytes (the limit)")
            out.write(chunk)
    return written


Member = tuple[str, str, BinaryIO | None]


def _tar_members(archive: Path, where: str) -> Iterator[Member]:
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for info in tar:  # streamed: a million-member archive is refused at the limit, not listed first
                if info.isdir():
                    yield info.name, "dir", None
                elif info.isreg():
                    stream = tar.extractfile(info)
                    assert stream is not None
                    yield info.name, "file", stream
                else:
                    yield _refuse(info.name, _tar_kind(info), where)
    except (tarfile.TarError, EOFError, OSError) as err:
        if isinstance(err, OSError) and not isinstance(err, tarfile.TarError) and err.errno is not None:
            raise
        raise UnsafeArchive(f"{where}: not a readable tar or zip archive ({type(err).__name__}: {err})") from None


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"a symlink to {info.linkname!r}"
    if info.islnk():
        return f"a hard link to {info.linkname!r}"
    return "a device or FIFO" if info.isdev() else "not a regular file"


def _zip_members(archive: Path, where: str) -> Iterator[Member]:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                kind = stat.S_IFMT(info.external_attr >> 16)  # 0: written without a file type (a plain file)
                if kind == stat.S_IFLNK:
                    yield _refuse(info.filename, "a symlink", where)
                elif kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    yield _refuse(info.filename, "a device or FIFO", where)
                elif info.is_dir():
                    yield info.filename, "dir", None
                else:
                    with zf.open(info) as stream:
                        yield info.filename, "file", stream
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as err:
        raise UnsafeArchive(f"{where}: not a readable zip archive ({type(err).__name__}: {err})") from None


def _refuse(name: str, kind: str, where: str) -> Member:
    raise UnsafeArchive(f"{where}: member {name!r} is {kind}: only files and folders are unpacked")
