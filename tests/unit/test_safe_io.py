"""safe_io: which OS errors are the job file's fault (exit 2) and which the infrastructure's (exit 1, DiskFull
for a full disk), the field a path belongs to, and atomic writes that keep the old file on any failure."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from finetune_api.errors import EXIT_INVALID_JOB, EXIT_RUNTIME_ERROR, DiskFull, JobFileError, TrainingError
from finetune_trainer import safe_io

pytestmark = pytest.mark.unit

FIELDS = {"output.path": "/output", "training.featureCacheDir": "/output/shared-cache", "dataset.path": "/data"}


@pytest.mark.parametrize(("code", "kind", "exit_code"), [
    (errno.ENOSPC, DiskFull, EXIT_RUNTIME_ERROR), (errno.EDQUOT, DiskFull, EXIT_RUNTIME_ERROR),
    (errno.ENOENT, JobFileError, EXIT_INVALID_JOB), (errno.ENOTDIR, JobFileError, EXIT_INVALID_JOB),
    (errno.EISDIR, JobFileError, EXIT_INVALID_JOB), (errno.ENAMETOOLONG, JobFileError, EXIT_INVALID_JOB),
    (errno.EACCES, JobFileError, EXIT_INVALID_JOB), (errno.EROFS, JobFileError, EXIT_INVALID_JOB),
    (errno.EIO, TrainingError, EXIT_RUNTIME_ERROR),
])
def test_each_os_error_is_one_line_naming_field_and_path(code: int, kind: type, exit_code: int) -> None:
    err = safe_io.os_error(OSError(code, os.strerror(code), "/output/checkpoints/epoch-0003.pt"), FIELDS)
    assert type(err) is kind and err.exit_code == exit_code
    text = str(err)
    assert "\n" not in text and text.startswith(f"output.path: /output/checkpoints/epoch-0003.pt: {os.strerror(code)}")


def test_the_most_specific_field_names_a_path_and_a_stranger_path_gets_none() -> None:
    assert safe_io.field_of("/output/shared-cache/features-1.pt", FIELDS) == "training.featureCacheDir"
    assert safe_io.field_of("/output", FIELDS) == "output.path"
    assert safe_io.field_of("/outputs/x", FIELDS) is None  # a sibling with a common prefix is not inside
    assert str(safe_io.os_error(OSError(errno.EIO, "Input/output error", "/tmp/x"), FIELDS)).startswith("/tmp/x: ")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.json"
    target.write_text("old")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text("new, half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as caught:
        safe_io.atomic_write(target, half_then_fail)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)  # not the temp name
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.json"]


def test_read_bytes_refuses_oversized_files_and_fifos(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 11)
    with pytest.raises(JobFileError, match="larger than 10 bytes"):
        safe_io.read_bytes(tmp_path / "big", 10, "model.json")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(JobFileError, match="not a regular file"):
        safe_io.read_bytes(tmp_path / "fifo", 10, "model.json")
