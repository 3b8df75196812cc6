"""How many cores this process may use (affinity mask, cgroup v2 quota), and whether it is one rank of a group.

No torch here: cmd_train asks before torch is imported (plot_helper).
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


def single_process() -> bool:
    """Not one rank of a torchrun group (whose ranks share the machine's cores)."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1") <= 1
