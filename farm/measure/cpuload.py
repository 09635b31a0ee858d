"""CPU-load accounting: how busy other processes kept this process's cores during a timed window.

A measurement records `foreign_cpus` (the average CPUs other processes kept busy on its cores) and a window
above CONTAMINATED_CPUS is flagged rather than reported as clean. Read from /proc/stat per core, so a node
pinned to some cores of a shared machine sees only its own cores' load.
"""

from __future__ import annotations

import os
import resource
import time

CONTAMINATED_CPUS = 0.3


def busy_seconds() -> float:
    """CPU seconds used by all processes on the cores this process may run on (from /proc/stat)."""
    cores = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name in cores:
                vals = [int(x) for x in fields[:8]]
                total += sum(vals) - vals[3] - vals[4]  # all but idle and iowait
    return total / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def mark() -> tuple[float, float, float]:
    """The start of a window: (busy seconds, own CPU seconds, monotonic wall time)."""
    return busy_seconds(), own_cpu(), time.monotonic()


def foreign_since(busy0: float, own0: float, wall0: float) -> float:
    """Average CPUs other processes kept busy on this process's cores since (busy0, own0, wall0)."""
    return max(0.0, (busy_seconds() - busy0) - (own_cpu() - own0)) / (time.monotonic() - wall0)
