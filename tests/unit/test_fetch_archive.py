"""Hostile dataset archives are refused with nothing written outside the target (and, through fetch, nothing
published into the cache); a good one unpacks to its ImageFolder."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from finetune_api.source import UnsafeArchive
from finetune_trainer.archive import Limits, unpack


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _special(name: str, kind: bytes, link: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, None


def _everything_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


HOSTILE_TARS = {
    "absolute path": [_file("/tmp/finetune-evil-abs")],
    "dot-dot": [_file("cat/../../evil")],
    "dot-dot at the start": [_file("../evil")],
    "symlink out": [_special("cat/link", tarfile.SYMTYPE, "/etc"), _file("cat/link/passwd")],
    "symlink relative out": [_special("escape", tarfile.SYMTYPE, "../.."), _file("escape/evil")],
    "hard link out": [_special("cat/hard", tarfile.LNKTYPE, "/etc/passwd")],
    "character device": [_special("cat/null", tarfile.CHRTYPE)],
    "fifo": [_special("cat/pipe", tarfile.FIFOTYPE)],
    "duplicate member": [_file("cat/a.png"), _file("cat/a.png", b"second")],
    "control characters": [_file("cat/a\x1b[2J.png")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_hostile_tar_is_refused_and_nothing_lands_outside(tmp_path, case):
    archive = _tar(tmp_path / "hostile.tar.gz", HOSTILE_TARS[case])
    box = tmp_path / "box"
    target = box / "target"
    target.mkdir(parents=True)
    before = _everything_under(tmp_path)
    with pytest.raises(UnsafeArchive) as err:
        unpack(archive, target, "dataset.uri s3://b/hostile.tar.gz")
    assert "dataset.uri s3://b/hostile.tar.gz" in str(err.value)
    outside = _everything_under(tmp_path) - before
    assert all(p.startswith("box/target") for p in outside), outside
    assert not Path("/tmp/finetune-evil-abs").exists() and not (tmp_path / "evil").exists()


def test_member_count_and_written_bytes_are_capped(tmp_path):
    many = _tar(tmp_path / "many.tar.gz", [_file(f"cat/{i}.png") for i in range(50)])
    (tmp_path / "t1").mkdir()
    with pytest.raises(UnsafeArchive, match="more than 20 members"):
        unpack(many, tmp_path / "t1", "dataset", Limits(max_files=20, max_bytes=1 << 30))
    # A zip whose members inflate far past what the archive weighs: counted as written, not as declared.
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/zeros.png", b"\0" * (8 << 20))
    assert bomb.stat().st_size < 100_000
    (tmp_path / "t2").mkdir()
    with pytest.raises(UnsafeArchive, match="more than 1048576 bytes"):
        unpack(bomb, tmp_path / "t2", "dataset", Limits(max_files=10, max_bytes=1 << 20))


def test_zip_symlinks_and_traversal_are_refused(tmp_path):
    link = zipfile.ZipInfo("cat/link")
    link.external_attr = (0o120777 << 16)
    for name, info, data in (("link.zip", link, b"/etc/passwd"), ("dotdot.zip", "../../evil.png", b"x"),
                             ("abs.zip", "/abs/evil.png", b"x")):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(info, data)
        target = tmp_path / f"t-{name}"
        target.mkdir()
        with pytest.raises(UnsafeArchive):
            unpack(path, target, "dataset")
    assert not (tmp_path.parent / "evil.png").exists() and not Path("/abs/evil.png").exists()


def test_a_good_tar_and_zip_unpack_to_the_image_folder(tmp_path):
    good = _tar(tmp_path / "good.tar.gz", [_file("train/cat/1.png", b"1"), _file("./train/dog/2.png", b"2")])
    (tmp_path / "t").mkdir()
    assert unpack(good, tmp_path / "t", "dataset") == 2
    assert _everything_under(tmp_path / "t") == {"train", "train/cat", "train/cat/1.png", "train/dog",
                                                  "train/dog/2.png"}
    z = tmp_path / "good.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("cat/", b"")
        zf.writestr("cat/1.png", b"1")
    (tmp_path / "z").mkdir()
    assert unpack(z, tmp_path / "z", "dataset") == 1 and (tmp_path / "z" / "cat" / "1.png").read_bytes() == b"1"


def test_not_an_archive_is_unsafe_archive_exit_2(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not gzip")
    (tmp_path / "t").mkdir()
    with pytest.raises(UnsafeArchive, match="not a readable"):
        unpack(junk, tmp_path / "t", "dataset")
    assert UnsafeArchive("x").exit_code == 2


def test_fetch_of_a_hostile_archive_publishes_nothing(tmp_path, monkeypatch):
    """Through fetch_source: the refusal leaves no cache entry and no temp folder."""
    import fsspec

    from finetune_api.spec import parse_spec
    from finetune_trainer.fetch import fetch_job

    _tar(tmp_path / "hostile.tar.gz", HOSTILE_TARS["symlink out"])
    memory = fsspec.filesystem("memory")
    memory.pipe("/bucket/hostile.tar.gz", (tmp_path / "hostile.tar.gz").read_bytes())
    monkeypatch.setattr(fsspec, "filesystem", lambda protocol, **kw: memory)
    spec = parse_spec({"dataset": {"uri": "s3://bucket/hostile.tar.gz"}, "output": {"path": str(tmp_path / "out")}})
    with pytest.raises(UnsafeArchive, match="symlink"):
        fetch_job(spec)
    assert list((tmp_path / "out" / "sources").iterdir()) == []
