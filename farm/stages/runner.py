"""Run one stage of the grid, of whatever kind (farm/stages/<kind>.py does the work), into storage.

`run_stage(stage, deps)` is plain Python: tests call it inline, the driver calls it inside a Ray task.
Each stage writes into its own directory in storage (published atomically) and returns a small dict,
never model weights; a stage whose result.json already exists is not run again (its kind's `reuse` says
when a stored result may stand for this machine or this job too).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from farm import nodes, storage
from farm.errors import StageError
from farm.stages import STAGES
from farm.stages.common import path_keys

# recorded with every stage result and logged as tags (farm.version.*)
LIBRARIES = ("farm", "torch", "transformers", "llama-cpp-python", "ray", "mlflow", "numpy")


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _absolute(result: dict, final: Path) -> dict:
    """Paths a stage wrote inside its own directory are stored relative and resolved on read."""
    out = dict(result)
    for k in path_keys():
        if k in out and not os.path.isabs(out[k]):
            out[k] = str((final / out[k]).resolve())
    return out


def stored_result(name: str, pin: str | None = None) -> dict | None:
    """A finished stage's result as storage holds it, its paths on this node (fetched from a remote store,
    with `pin` only if its manifest has that sha256)."""
    result = storage.read_result(name, pin)
    return None if result is None else _absolute(result, storage.stage_dir(name))


def local(dep: dict) -> dict:
    """A dependency's result with its paths on this node (stages in a remote store are fetched first, each
    only if its manifest is the one the driver was told of: the dependency's pins)."""
    keys = path_keys()
    return {k: str(storage.here(v, dep.get("pins"))) if k in keys else v for k, v in dep.items()}


def storage_name(stage, job: str | None = None, labels: dict | None = None) -> str:
    """Where a stage's result is kept. A benchmark measures a machine at a time, so under its kind's reuse
    policy (the sweep's bench.reuse) its name also carries what decides its speed (same_kind: CPU model, family,
    ISA, CPUs, memory, NUMA nodes, the Ray node's labels but its name, the libraries' versions, so that a node
    the autoscaler starts in place of another of its kind reuses what that one measured; same_host: this very
    machine, host name included) or the Ray job (never): another kind of machine, or another job, measures anew
    rather than reusing a figure from elsewhere. 'always' (every kind without a policy) keeps the content id.
    job: the Ray job running it (the driver says; else this process stands for the job); labels: its node's."""
    reuse = getattr(STAGES.get(stage.kind), "reuse", None)
    policy = reuse(stage) if reuse else "always"
    if policy == "always":
        return stage.name
    if policy == "same_kind":
        f = nodes.facts()
        key = [f["model_name"], f.get("family"), f.get("isa"), f["logical_cpus"], f["memory_gb"], f.get("numa_nodes"),
               len(os.sched_getaffinity(0)), sorted((k, v) for k, v in (labels or {}).items() if k != "farm/node"),
               sorted(library_versions().items())]
    elif policy == "same_host":
        f = nodes.facts()
        key = [f["hostname"], f["model_name"], f["logical_cpus"], f["memory_gb"], sorted(os.sched_getaffinity(0))]
    else:
        key = [job or _process()]
    return f"{stage.name}@{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:10]}"


def _process() -> str:
    return f"process-{os.getpid()}-{PROCESS_START}"


PROCESS_START = time.time()


def run_stage(stage, deps: list[dict], node: dict | None = None) -> dict:
    """Run a stage, or return its stored result. `node`: where it runs (recorded with the result)."""
    started = time.time()  # before the look-up: a run that finds nothing began before any other run's end
    name = storage_name(stage, (node or {}).get("job_id"), (node or {}).get("node_labels"))
    final = storage.stage_dir(name)
    # the manifests of every stage this one reads from, as the driver holds them (a remote store only)
    pins = {k: v for d in deps for k, v in (d.get("pins") or {}).items()}
    found = storage.read_result(name)
    if found is not None and not _stands(stage, found, (node or {}).get("job_id") or _process()):
        print(f"farm: {name}: the stored result was disturbed (its kind says it does not stand); measuring again",
              flush=True)
        storage.discard(name)
        found = None
    if found is not None:
        digest = storage.upload(name)  # a no-op unless a remote store missed it (a writer killed mid-upload)
        return {**_absolute(_held(name), final), "cached": True, **_pins(pins, name, digest)}
    deps = [local(d) for d in deps]
    t0 = time.time()
    with storage.publishing(final) as tmp:
        result = work(stage.kind)(stage, deps, tmp)
        # "stage": its name in storage (a benchmark's carries its machine)
        result.update({"stage": name, "kind": stage.kind, "params": stage.params, "seconds": time.time() - t0,
                       "host": nodes.facts(), "versions": library_versions(), **(node or {}),
                       "job": (node or {}).get("job_id") or _process()})
        (tmp / "result.json").write_text(text := json.dumps(result, indent=1, default=str))
    digest = storage.upload(name)
    _ledger(name, stage.kind, started, node)
    held, mine = _held(name), (final / "result.json").read_text() == text  # another writer's, if theirs came first
    return {**_absolute(held, final), "cached": not mine, **_pins(pins, name, digest)}


def work(kind: str):
    """The kind's work: its run(stage, deps, out). $FARM_STAGE_WORK ('module:function', same signature) stands in
    for every kind's: the cluster simulation (benchmarks/simcluster.py) runs the real driver, storage and ledger
    on stages that only sleep."""
    alt = os.environ.get("FARM_STAGE_WORK")
    if not alt:
        return STAGES.get(kind).run
    module, _, name = alt.partition(":")
    return getattr(importlib.import_module(module), name)


def _stands(stage, result: dict, job: str) -> bool:
    """Whether a stored result may stand for this run: its kind's `stands(result)` (a benchmark disturbed by other
    load does not), unless it is this very job's own (a job never measures a stage twice)."""
    stands = getattr(STAGES.get(stage.kind), "stands", None)
    return stands is None or stands(result) or result.get("job") == job


def _held(name: str) -> dict:
    """What storage holds for a stage just published or found (after an upload: the store's copy). Publishing is
    first-writer-wins, so a caller always gets what storage holds, not its own result if another came first."""
    result = storage.read_result(name)
    if result is None:
        raise StageError(f"stage {name} vanished from storage ({storage.root()}) just after it was published")
    return result


def _ledger(name: str, kind: str, started: float, node: dict | None) -> None:
    """One line per stage this node actually ran (a reused result writes none) in $FARM_HOME/ledger.jsonl:
    what each node spent its time on, and the evidence that no stage is run again once it has finished —
    a run that starts after another run of the same stage ended would be one (`reruns`)."""
    line = {"stage": name, "kind": kind, "job": (node or {}).get("job_id") or _process(), "host": os.uname().nodename, "pid": os.getpid(),
            "node_labels": (node or {}).get("node_labels", {}), "started": started, "ended": time.time()}
    path = _ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:  # one short O_APPEND write: lines of concurrent stages stay whole
        f.write(json.dumps(line) + "\n")


def _ledger_path() -> Path:
    return storage.home() / "ledger.jsonl"


def ledger(since: float = 0.0) -> list[dict]:
    """The ledger's lines for runs that started at or after `since`."""
    path = _ledger_path()
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["started"] >= since]


def reruns(entries: list[dict]) -> list[tuple[dict, dict]]:
    """(an earlier run, a later one) of the same stage where the later one started after the earlier ended:
    work done again although its result was already stored. Runs that overlap (two sweeps reaching a shared
    stage at once, before either had published) are not reruns."""
    found = []
    by_stage: dict[str, list[dict]] = {}
    for e in entries:
        by_stage.setdefault(e["stage"], []).append(e)
    for runs in by_stage.values():
        first_end = min(runs, key=lambda e: e["ended"])
        found += [(first_end, e) for e in runs if e["started"] > first_end["ended"]]
    return found


def _pins(pins: dict, name: str, digest: str | None) -> dict:
    return {"pins": {**pins, name: digest}} if digest else {}
