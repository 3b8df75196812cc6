"""`finetune-train torchrun ARGS…`: PyTorch's torchrun, keeping the trainer's exit codes.

torchrun exits 1 whenever a worker fails, which would hide what the Job's podFailurePolicy keys on:
2 (invalid job file: never retried), 75 (checkpointed after SIGTERM: not counted) and 1 (crash:
retried). This runs torch's own launcher — same arguments, same elastic agent, rendezvous and
signal forwarding (torch.distributed.run) — and exits with the code of the first failed worker.
"""

from __future__ import annotations

import logging

from finetune_api.errors import EXIT_OK, EXIT_PREEMPTED

log = logging.getLogger("finetune")


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        log.error("worker rank %s failed with exit code %s", rank, failure.exitcode)
        return exit_code(failure.exitcode)
    except SignalException as err:
        # The agent forwarded the signal to the trainer (which finishes its step, lets rank 0 save a
        # checkpoint and exits 75) and waited --shutdown-timeout for it: a restart resumes.
        log.warning("torchrun stopped by %s", err.sigval.name)
        return EXIT_PREEMPTED
    return EXIT_OK


def exit_code(code: int) -> int:
    """A worker killed by signal N (torch reports -N) exits 128 + N, as a shell would report it."""
    return 128 - code if code < 0 else code
