"""Which files of an ImageFolder dataset are images, and in which order a run reads them (no torch here).

data.py builds its splits from these; decode_ahead reads them before torch is imported.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def scan_class_dirs(root: Path) -> dict[str, list[Path]]:
    """{class folder: its image files, sorted, recursively}: hidden folders are not classes."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    return {c: sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            for c in classes}


def reading_order(root: Path) -> list[Path]:
    """The dataset's image files in the order a run first reads them: train/, val/, test/ when the folder has
    train/ and val/ (else the folder itself), classes and files sorted — data.load_splits' layouts."""
    parts = [root / "train", root / "val", root / "test"] if (root / "train").is_dir() and (root / "val").is_dir() \
        else [root]
    return [p for part in parts if part.is_dir() for files in scan_class_dirs(part).values() for p in files]
