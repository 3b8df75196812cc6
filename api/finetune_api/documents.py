"""Reading a YAML document a user handed us (job file, sweep file) when its bytes may be anything.

Any failure is one JobFileError line: a path that is not a readable file, more than MAX_BYTES (the API
server refuses objects near that size anyway), bytes that are not UTF-8/UTF-16 text (PyYAML reads the
byte-order mark), YAML that is malformed, holds more than one document or tags that would build Python
objects (safe_load refuses those), nesting deep enough to exhaust the parser's recursion, or aliases that
expand a small file into billions of nodes or into itself. No torch, no kubernetes: the operator imports it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from finetune_api.errors import JobFileError

MAX_BYTES = 1 << 20
MAX_NODES = 200_000  # mappings, lists and scalars counted through aliases: far beyond any real spec


def read_yaml_document(path: str | Path, what: str = "job file") -> Any:
    """The document's data, unvalidated."""
    data = _read(Path(path), what)
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as err:
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise JobFileError(f"{what} {path} is not valid YAML: {line}") from None
    except RecursionError:
        raise JobFileError(f"{what} {path} is nested too deeply to be a FineTuneJob") from None
    _check_size(doc, f"{what} {path}")
    return doc


def _read(path: Path, what: str) -> bytes:
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise JobFileError(f"cannot read {what} {path}: it is a directory")
        # Non-blocking open, blocking reads: a FIFO without a writer reads as empty instead of hanging, and
        # `-f <(…)` (a pipe with a writer) still reads all of it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise JobFileError(f"cannot read {what} {path}: {err.strerror or type(err).__name__}") from None
    if len(data) > MAX_BYTES:
        raise JobFileError(f"{what} {path} is larger than {MAX_BYTES} bytes; a FineTuneJob is a few KiB")
    return data


def _check_size(doc: Any, where: str) -> None:
    """Walk the document as consumers will (aliases expanded), stopping at the first sign of a bomb."""
    budget, stack, open_ids = MAX_NODES, [(doc, False)], set()
    while stack:
        node, leaving = stack.pop()
        if leaving:
            open_ids.discard(id(node))
            continue
        budget -= 1
        if budget < 0:
            raise JobFileError(f"{where} expands to more than {MAX_NODES} values (YAML aliases?); refusing it")
        if isinstance(node, dict | list):
            if id(node) in open_ids:
                raise JobFileError(f"{where} contains a value that refers to itself (a recursive YAML alias)")
            open_ids.add(id(node))
            stack.append((node, True))
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((child, False) for child in children)
