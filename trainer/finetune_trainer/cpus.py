"""How many cores this process may use (affinity mask, cgroup v2 quota), and whether it is one rank of a group.

os.cpu_count() is the node's cores: in a pod limited to 2 CPUs on a 64-core node it says 64, and a process
that sizes loader workers or thread pools by it gets throttled by the CFS quota. Everything that sizes
parallel work asks here instead. No torch here: cmd_train asks before torch is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def quota_cores(cpu_max: Path | None = None) -> int | None:
    """The cgroup v2 CPU quota in whole cores (rounded down, at least 1); None without a quota."""
    try:
        quota, period = (cpu_max or CPU_MAX).read_text().split()[:2]
        return None if quota == "max" else max(1, int(quota) // int(period))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def usable_cores(cpu_max: Path | None = None) -> int:
    """Cores this process may use: the affinity mask, capped by a cgroup v2 CPU quota (a pod's limit)."""
    cores, quota = _mask(), quota_cores(cpu_max)
    return max(1, min(cores, quota) if quota is not None else cores)


def spare_cores() -> int:
    """Cores this process may use beyond one."""
    return usable_cores() - 1


def cap_threads(environ: dict | None = None, cpu_max: Path | None = None) -> int | None:
    """Before torch is imported: size its thread pools by the CPU quota when nothing else did.

    torch sizes its pool by the cores it can see (the affinity mask), not by a quota: under a smaller quota
    (docker --cpus, a pod limit without the operator's OMP_NUM_THREADS) the surplus threads only wait on the
    CFS throttle. Sets OMP_NUM_THREADS to the quota's cores and returns it; None (nothing changed) when
    OMP_NUM_THREADS is already set or there is no quota below the mask."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return None
    cores = usable_cores(cpu_max)
    if cores >= _mask():
        return None
    environ["OMP_NUM_THREADS"] = str(cores)
    return cores


def _mask() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def single_process() -> bool:
    """Not one rank of a torchrun group (whose ranks share the machine's cores)."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1") <= 1
