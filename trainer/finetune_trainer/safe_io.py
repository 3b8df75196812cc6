"""Files on volumes the trainer does not control: atomic writes, capped reads, and OS errors as one line.

Every file is written to a temp name in its own directory, fsynced and `os.replace`d, so a kill or a full
disk at any instant leaves either the old file or the new one — never half of one — and the temp file never
outlives a failure. Serializers that report a full disk in their own words (torch.save raises a RuntimeError
about a stream position, safetensors its own error) are recognised by the free space left or their message
and turned back into ENOSPC, so the caller sees the one error a full disk should be: `DiskFull`, exit 1, retried.

`os_errors(fields)` turns any OSError escaping a command into a FinetuneError naming the path and the spec
field (or flag) whose value holds it: a read-only or misplaced volume is the job file's fault (exit 2,
never retried); a full disk or an I/O error is the infrastructure's (exit 1, retried).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from finetune_api.errors import DiskFull, FinetuneError, JobFileError, TrainingError

log = logging.getLogger(__name__)

FULL_DISK = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Wrong paths, permissions and read-only volumes: the same job fails the same way on every retry.
WRONG_INPUT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM,
                         errno.EROFS, errno.ELOOP, errno.EEXIST, errno.ENOTEMPTY, errno.EXDEV, errno.ENXIO})
# A serializer's failure with less than this free is taken for a full disk (a write fills it to the block).
FULL_BELOW_BYTES = 64 << 10
Fields = Mapping[str, "str | Path | None"]


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call write(tmp_path) then rename it over `path`; the temp file never outlives a failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            write(tmp)
        except OSError:
            raise
        except Exception as err:
            if out_of_space(path.parent) or _says_enospc(err):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
            raise
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; exports are read by other users (serving pods)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.filename in (None, tmp):  # name the file the user knows, not our temp name
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)


def _sync_dir(folder: Path) -> None:
    """The rename itself survives a power loss only once the directory is synced (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def out_of_space(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BELOW_BYTES


def _says_enospc(err: BaseException) -> bool:
    """safetensors reports the OS error in its text (and may have freed its partial file already)."""
    text = str(err)
    return os.strerror(errno.ENOSPC) in text or f"os error {errno.ENOSPC})" in text


def read_bytes(path: Path, limit: int, what: str) -> bytes:
    """A whole file of at most `limit` bytes; a FIFO or device is refused before it can block the read."""
    path = Path(path)
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(st.st_mode):
        raise JobFileError(f"{what}: {path} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise JobFileError(f"{what}: {path} is larger than {limit} bytes; refusing to read it")
    return data


def regular_file(path: Path, what: str) -> Path:
    """`path` when it is a regular file (through symlinks); else one line saying what it is instead."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as err:
        raise os_error(err, {what: path}) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise JobFileError(f"{what}: {path} is {kind}")
    return path


def os_error(err: OSError, fields: Fields) -> FinetuneError:
    """One line: `<field>: <path>: <what the OS said>`, as DiskFull, JobFileError or TrainingError."""
    path = err.filename if err.filename is not None else ""
    field = field_of(str(path), fields) if path else None
    where = f"{field}: " if field else ""
    what = f"{path}: " if path else ""
    reason = err.strerror or type(err).__name__
    if err.errno in FULL_DISK:
        return DiskFull(f"{where}{what}{reason} — nothing half-written was kept and earlier files (the last good "
                        "checkpoint, an earlier export) are intact; give the volume more space and retry")
    if err.errno in WRONG_INPUT:
        return JobFileError(f"{where}{what}{reason}")
    return TrainingError(f"{where}{what}{reason} (errno {err.errno})")


def job_fields(spec: Any) -> dict[str, str | None]:
    """The spec fields of a FineTuneJobSpec that name files or folders, by their wire names."""
    teacher = spec.distillation.teacher if spec.distillation else None
    return {"output.path": spec.output.path, "dataset.path": spec.dataset.path,
            "model.weights.path": spec.model.weights.path, "training.featureCacheDir": spec.training.feature_cache_dir,
            "distillation.teacher.fromJob": teacher.from_job if teacher else None,
            "distillation.teacher.model.weights.path": teacher.model.weights.path if teacher and teacher.model
            else None}


def first_line(err: BaseException, limit: int = 160) -> str:
    """An exception's message as one short line (library messages span lines and quote whole tensors)."""
    text = str(err).strip()
    return (text.splitlines()[0][:limit] if text else "") or type(err).__name__


def field_of(path: str, fields: Fields) -> str | None:
    """The field whose value is `path` or the folder that holds it (the longest such value wins)."""
    best, length = None, -1
    target = os.path.abspath(path)
    for name, value in fields.items():
        if value is None:
            continue
        root = os.path.abspath(str(value))
        inside = target == root or target.startswith(root.rstrip(os.sep) + os.sep)
        if inside and len(root) > length:
            best, length = name, len(root)
    return best


@contextlib.contextmanager
def os_errors(fields: Fields) -> Iterator[None]:
    """Any OSError escaping the block becomes os_error()'s one line."""
    try:
        yield
    except OSError as err:
        raise os_error(err, fields) from None


def check_writable(folder: Path, field: str) -> None:
    """Create `folder` and a probe file in it, before any work: a read-only or misplaced output volume fails
    in seconds instead of after the first epoch."""
    with os_errors({field: folder}):
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)


def quarantine(path: Path) -> Path | None:
    """Rename a file that cannot be used out of the way (never deleted: it may be worth a look; the caller
    says so); None when the volume refuses the rename too."""
    target = path.with_name(path.name + ".unreadable")
    try:
        os.replace(path, target)
    except OSError as err:
        log.warning("cannot move %s aside (%s); it is skipped", path, err.strerror)
        return None
    return target
