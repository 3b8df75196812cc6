"""What share of the machine this process may use: cores (affinity, cgroup v2 quota) and memory (cgroup v2 limit).

No torch here: the start-up helpers (decode_ahead, plot_helper) ask before torch is imported.
"""

from __future__ import annotations

import os
from pathlib import Path


def spare_cores() -> int:
    """Cores this process may use beyond one: the affinity mask, capped by a cgroup v2 CPU quota (a pod's limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return max(0, cores - 1)


def memory_limit() -> int | None:
    """The cgroup v2 memory limit in bytes, or None when there is none (or no cgroup v2)."""
    try:
        value = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        return None if value == "max" else int(value)
    except (OSError, ValueError):
        return None


def single_process() -> bool:
    """Not one rank of a torchrun group (whose ranks share the machine's cores)."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1") <= 1
