"""Exit codes, the errors that map to them, and the one-line form of a validation error.

The operator's Job podFailurePolicy keys on these codes: an invalid job file is never
retried, a runtime failure is, a preemption does not count against backoffLimit.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1  # also what Python gives for an uncaught exception
EXIT_INVALID_JOB = 2  # bad job file or bad input data: retrying cannot help
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving a checkpoint


class FinetuneError(Exception):
    """Base class for errors with a user-facing one-line message."""

    exit_code = EXIT_RUNTIME_ERROR


class JobFileError(FinetuneError):
    """The job file, its data or its weights are wrong: fix the input, don't retry."""

    exit_code = EXIT_INVALID_JOB


class TrainingError(FinetuneError):
    """Something failed while running; a retry may succeed."""

    exit_code = EXIT_RUNTIME_ERROR


class DiskFull(TrainingError):
    """No space left while writing a checkpoint, cache or export: the temp file is gone, the last good files are
    kept, and a retry once the volume has room resumes (exit 1, status reason DiskFull)."""

    exit_code = EXIT_RUNTIME_ERROR


class Preempted(FinetuneError):
    """SIGTERM arrived: the last checkpoint is on disk, the next attempt resumes from it."""

    exit_code = EXIT_PREEMPTED


def format_validation_error(err: ValidationError, prefix: str = "spec") -> str:
    """One line per problem: `spec.training.epochs: Input should be >= 1 (got -3)`."""
    lines = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = _shorten_choices(e["msg"].removeprefix("Value error, "))
        got = e.get("input")
        shown = "" if e["type"] == "missing" or isinstance(got, dict) else f" (got {_short(got)})"
        lines.append(f"{loc}: {msg}{shown}")
    return "; ".join(lines)


def _shorten_choices(msg: str, keep: int = 8) -> str:
    """Long enum lists (80 architectures) are cut to a readable sample plus a count."""
    choices = re.findall(r"'([^']*)'", msg)
    if not msg.startswith("Input should be") or len(choices) <= keep:
        return msg
    shown = ", ".join(choices[:keep])
    return f"Input should be one of {len(choices)} names such as {shown}, …"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
