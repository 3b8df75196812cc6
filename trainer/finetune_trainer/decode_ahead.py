"""Decoding ahead: while the trainer imports torch, a thread decodes the dataset's first images on a spare core.

A `finetune-train train` process spends its first seconds importing torch, torchvision and timm — Python
code on one core, with the GIL held. On a machine with a second core, that core is idle until the first
batch; the images the first pass reads could be decoded there. This module needs only PIL and the standard
library, so cmd_train starts it before torch is imported: one daemon thread opens the dataset's files in the
order the frozen pass reads them (image_files.reading_order) and keeps each as the same RGB PIL image
Sample.load() makes. PIL releases the GIL while it decompresses and converts, so the imports go on beside it.
A data-parallel group does not decode ahead: its ranks share the machine's cores and each reads only a shard.

Sample.load() takes a decoded image once (taking removes it: later reads decode as before). The thread
stops at the first batch — from then on both cores belong to the network, and a decoding thread beside it
measured slower than decoding in line (pass_input.pass_plan) — or when it holds its memory budget. Images
nobody took are dropped when the run ends (release()). Decoding ahead changes no pixel: the same file, the
same PIL calls; a file that fails to decode here is simply left for Sample.load() to fail on as before.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from PIL import Image

from finetune_trainer import cpus
from finetune_trainer.image_files import reading_order

# At most this many bytes of decoded pixels wait to be taken, and never more than 1/8 of the memory the
# process may use: enough for the start-up window (about 3 s of decoding, a few thousand small photos).
BUDGET_BYTES = 256 << 20


class DecodeAhead:
    """One thread decoding `paths` in order into a dict of RGB images, until stopped or over budget."""

    def __init__(self, paths: list[Path], budget: int = BUDGET_BYTES) -> None:
        self._paths, self._budget = paths, budget
        self._ready: dict[str, Image.Image] = {}
        self._claimed: set[str] = set()  # read in line before the thread got there: the thread skips them
        self._lock, self._stop = threading.Lock(), threading.Event()
        self.decoded, self.taken, self.held, self.seconds = 0, 0, 0, 0.0
        self._thread = threading.Thread(target=self._run, name="finetune-decode-ahead", daemon=True)

    def start(self) -> DecodeAhead:
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.perf_counter()
        for path in self._paths:
            key = str(path)
            if self._stop.is_set() or self.held >= self._budget:
                break
            with self._lock:
                if key in self._claimed:
                    continue
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
            except Exception:  # unreadable here is unreadable in Sample.load(), which says so in its place
                continue
            with self._lock:
                if key not in self._claimed:
                    self._ready[key] = image
                    self.decoded += 1
                    self.held += image.width * image.height * 3
        self.seconds = time.perf_counter() - start

    def take(self, path: str) -> Image.Image | None:
        """The decoded image of `path` (once), or None: then the caller decodes it, and the thread will not."""
        with self._lock:
            image = self._ready.pop(path, None)
            if image is None:
                self._claimed.add(path)
                return None
            self.taken += 1
            self.held -= image.width * image.height * 3
            return image

    def stop(self) -> None:
        self._stop.set()

    def release(self) -> None:
        """Stop and drop what nobody took (waits for the image being decoded, a few milliseconds)."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._ready.clear()
            self.held = 0

    def describe(self) -> dict:
        return {"images": self.decoded, "taken": self.taken, "seconds": round(self.seconds, 3)}


_active: DecodeAhead | None = None


def start(dataset_path: str | None) -> DecodeAhead | None:
    """Begin decoding a local ImageFolder dataset ahead where a core is spare; None (nothing started) otherwise."""
    global _active
    if not dataset_path or _active is not None or cpus.spare_cores() < 1 or not cpus.single_process():
        return None
    root = Path(dataset_path)
    try:
        paths = reading_order(root) if root.is_dir() else []
    except OSError:
        return None  # the scan in data.py reports what is wrong with the folder
    if not paths:
        return None
    limit = cpus.memory_limit()
    _active = DecodeAhead(paths, BUDGET_BYTES if limit is None else min(BUDGET_BYTES, limit // 8)).start()
    return _active


def take(path: str) -> Image.Image | None:
    return _active.take(path) if _active is not None else None


def stop() -> None:
    """The first batch has arrived: decode nothing more."""
    if _active is not None:
        _active.stop()


def describe() -> dict | None:
    """What decoding ahead did in this process so far (model.json's timings.decodedAhead), or None."""
    return _active.describe() if _active is not None else None


def finish() -> dict | None:
    """End decoding ahead for this process and drop what nobody took; what it did, or None."""
    global _active
    if _active is None:
        return None
    active, _active = _active, None
    active.release()
    return active.describe()
