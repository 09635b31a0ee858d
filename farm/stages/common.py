"""What stage kinds share: the defaults of their declarations, the threads a stage may use, paths of its
inputs, and how messages name what a runtime ran."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from farm.stages import STAGES

DEFAULTS = {"METRICS": (), "SECTION": None, "Config": None, "OPTIONAL": False, "PER": None, "INPUTS": (),
            "EXCLUSIVE": False, "AFTER": False, "PATHS": ()}


def declared(kind: str | ModuleType, name: str):
    """A kind's declaration `name`, or its default."""
    module = STAGES.get(kind) if isinstance(kind, str) else kind
    return getattr(module, name, DEFAULTS[name])


def kinds() -> list[ModuleType]:
    return STAGES.modules()


def measurements(after: bool | None = None) -> list[str]:
    """The kinds that measure each cell (PER set), in registration order; after: only those of that phase."""
    return [m.KIND for m in kinds() if declared(m, "PER") and (after is None or declared(m, "AFTER") == after)]


def scored_tasks(data: dict) -> dict[str, str]:
    """task -> which of its items the sweep scores ('held_out' half or whole 'split'), from every kind that
    declares `scored(data)`; read from the sweep as plain data (validation reads it before the schema passed)."""
    out: dict[str, str] = {}
    for m in kinds():
        if hasattr(m, "scored"):
            out.update(m.scored(data))
    return out


def path_keys() -> tuple[str, ...]:
    return tuple(k for m in kinds() for k in declared(m, "PATHS"))


def threads_here() -> int:
    """CPUs this process may use (Ray sets OMP_NUM_THREADS to a task's num_cpus)."""
    return int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))


def model_dir(dep: dict) -> Path:
    return Path(dep["model_dir"])


def runtime_module(runtime: dict) -> str:
    from farm.runtimes import RUNTIMES

    return RUNTIMES.module_name(runtime["name"])


def describe(export: dict, runtime: dict) -> str:
    """'gguf Q8_0 on llamacpp (amx)': what a runtime was running, for messages."""
    from farm.runtimes import RUNTIMES

    return f"{export['format']} {export['quant']} on " + RUNTIMES.options(runtime["name"])(**runtime).describe()
