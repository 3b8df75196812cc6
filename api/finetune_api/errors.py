"""Exit codes and the errors that map to them.

The operator's Job podFailurePolicy keys on these codes: an invalid job file is never
retried, a runtime failure is, a preemption does not count against backoffLimit.
"""

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


class Preempted(FinetuneError):
    """SIGTERM arrived: the last checkpoint is on disk, the next attempt resumes from it."""

    exit_code = EXIT_PREEMPTED
