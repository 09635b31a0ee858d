"""The sweep driver: the only module that imports ray.

Validate the sweep, expand the grid, then submit one Ray task per stage; a stage's dependencies are
passed as ObjectRefs of their small result dicts (paths in storage, never weights). Benchmarks take
every CPU of their node plus its `bench_slot`, so nothing else runs beside them, and a label selector
per target. Cells are logged to MLflow as soon as their evaluate and bench stages finish; a failed
cell becomes a FAILED run with its traceback and the sweep goes on.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import ray

from farm import grid as gridmod
from farm import spec as specmod
from farm.errors import SpecError, StageError
from farm.stages import run_stage

BENCH_SLOT = "bench_slot"


@ray.remote(max_retries=1, retry_exceptions=False)  # retried once when its worker or node is lost
def stage_task(stage, *deps, memory_limit: int | None = None):
    ctx = ray.get_runtime_context()
    node = {"node_id": ctx.get_node_id(),
            "node_labels": {k: v for k, v in ctx.get_node_labels().items() if not k.startswith("ray.io/")}}
    if not memory_limit:
        return run_stage(stage, list(deps), node)
    from farm import memguard, storage

    note = storage.home() / "memguard" / f"{ctx.get_job_id()}-{stage.name}.txt"
    memguard.check_note(note)  # a retry after the guard stopped this stage: fail with the reason
    with memguard.limit(memory_limit, note, f"stage {stage.kind}:{stage.id}"):
        return run_stage(stage, list(deps), node)


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray's label_selector semantics: 'v', '!v', 'in(a,b)', '!in(a,b)'."""
    for key, want in selector.items():
        have = labels.get(key)
        negate = want.startswith("!")
        want = want[1:] if negate else want
        values = [v.strip() for v in want[3:-1].split(",")] if want.startswith("in(") and want.endswith(")") else [want]
        hit = have in values
        if hit == negate:
            return False
    return True


def check_targets(sweep) -> dict[str, int]:
    """target name -> CPUs a benchmark there reserves; a target no node satisfies is a SpecError."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    inventory = "\n".join(
        f"      node {n['NodeID'][:12]}: {n.get('Labels', {})} resources {dict(n['Resources'])}" for n in nodes)
    problems, cpus = [], {}
    for i, t in enumerate(sweep.targets):
        match = [n for n in nodes if selector_matches(t.labels, n.get("Labels", {}))
                 and n["Resources"].get(BENCH_SLOT, 0) >= 1]
        if not match:
            problems.append(f"targets[{i}] '{t.name}': no alive node with a {BENCH_SLOT} matches labels "
                            f"{t.labels}; the cluster has:\n{inventory}")
            continue
        cpus[t.name] = int(min(n["Resources"].get("CPU", 1) for n in match))
    if problems:
        raise SpecError(problems, "cluster")
    return cpus


def task_options(stage, bench_cpus: dict[str, int], model_bytes: int | None, trust_code: bool = False,
                 stage_memory: int | None = None) -> dict:
    """Benchmarks: every CPU of a node that matches the target's labels, plus its bench slot. Other
    stages: one CPU anywhere, and the sweep's stage_memory_gb, else memory for ~3 copies of the float
    model (load, transform, save)."""
    name = f"{stage.kind}:{stage.id}"
    if trust_code:  # the sweep opted in to the model's own code: only its tasks get the permission
        return {**task_options(stage, bench_cpus, model_bytes, stage_memory=stage_memory),
                "runtime_env": {"env_vars": {"FARM_TRUST_REMOTE_CODE": "1"}}}
    if stage.kind == "bench":
        target = stage.params["target"]
        opts = {"num_cpus": bench_cpus[target["name"]], "resources": {BENCH_SLOT: 1}, "name": name}
        if target["labels"]:
            opts["label_selector"] = dict(target["labels"])
        return opts
    opts = {"num_cpus": 1, "name": name}
    if stage_memory:
        opts["memory"] = stage_memory
    elif model_bytes:
        opts["memory"] = 3 * model_bytes + 2**30
    return opts


def submit(grid, sweep) -> dict:
    bench_cpus = check_targets(sweep)
    model_bytes = specmod.base_bytes(sweep.base.model)
    stage_memory = int(sweep.stage_memory_gb * 2**30) if sweep.stage_memory_gb else None
    refs: dict = {}
    for sid, stage in grid.stages.items():  # insertion order is topological
        opts = task_options(stage, bench_cpus, model_bytes, sweep.base.trust_remote_code, stage_memory)
        limit = stage_memory if stage.kind != "bench" else None  # a benchmark owns its whole node
        refs[sid] = stage_task.options(**opts).remote(stage, *[refs[d] for d in stage.deps], memory_limit=limit)
    return refs


def strand(waiting: dict, stranded: dict) -> None:
    """Cancel benchmarks whose target has lost every node it could run on (a node died): Ray would
    keep them pending forever. Tasks on a lost node that another node can run are retried by Ray."""
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(BENCH_SLOT, 0) >= 1]
    for ref, cell in waiting.items():
        target = cell.spec["target"]
        if cell.id not in stranded and not any(selector_matches(target["labels"], n.get("Labels", {})) for n in nodes):
            stranded[cell.id] = (f"target '{target['name']}' lost every node that matches {target['labels']}; "
                                 "its benchmark was cancelled")
            ray.cancel(ref)


def print_cell(done: int, total: int, cell, evaluate: dict | None, bench: dict | None, error) -> None:
    from farm.tracking import cell_label

    label = cell_label(cell)
    if error is not None:
        print(f"[{done}/{total}] {label}: FAILED: {str(error).splitlines()[0][:300]}", flush=True)
        return
    m = {**evaluate["metrics"], **bench["metrics"]}
    print(f"[{done}/{total}] {label}: ppl {m['perplexity']:.3f}  kl {m['kl_div']:.4f}  top1 {m['top1_agree']:.3f}  "
          f"decode {m['decode_tok_s']:.1f} tok/s  prefill {m['prefill_tok_s']:.0f} tok/s  {m['size_mb']:.1f} MB"
          f"{'  (CONTAMINATED: other load on the node)' if bench.get('contaminated') else ''}", flush=True)


def _get(ref):
    try:
        return ray.get(ref), None
    except Exception as e:  # a failed stage, or one whose dependency failed
        return None, e


def run(path: str) -> int:
    from farm import tracking
    from farm.report import pareto_report

    t0 = time.time()
    if not Path(path).is_file():
        raise SpecError([f"file '{path}' does not exist — give the path of a sweep YAML file"], path)
    text = Path(path).read_text(encoding="utf-8")  # read once: ray.init may change the working directory
    sweep = specmod.loads(text, path)  # raises SpecError before anything is written anywhere
    grid = gridmod.build(sweep)
    ray.init(address="auto", log_to_driver=False)
    refs = submit(grid, sweep)  # check_targets may raise: still nothing written to MLflow
    log = tracking.SweepLog(sweep, grid, text)

    def stopped(signum, frame):  # `ray job stop` sends SIGTERM: say so in MLflow, then go
        log.abort(f"stopped by signal {signum}")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    print(f"farm: sweep '{sweep.name}': {len(grid.cells)} cells, {len(grid.stages)} stages; "
          f"MLflow run {log.run_id}", flush=True)
    pending = {cell.id: cell for cell in grid.cells}
    waiting = {refs[c.bench]: c for c in grid.cells}
    stranded: dict[str, str] = {}  # cell id -> why its benchmark can no longer run anywhere
    failed = 0
    while pending:
        ready, _ = ray.wait(list(waiting), num_returns=1, timeout=15)
        if not ready:
            strand(waiting, stranded)
            log.flush()  # cells queued while MLflow was unreachable
            continue
        cell = waiting.pop(ready[0])
        bench, err = _get(refs[cell.bench])
        evaluate, err2 = _get(refs[cell.evaluate])
        export, err3 = _get(refs[cell.export])
        error = StageError(stranded[cell.id]) if cell.id in stranded else (err or err2 or err3)
        log.log_cell(cell, export, evaluate, bench, error=error)
        del pending[cell.id]
        failed += error is not None
        print_cell(len(grid.cells) - len(pending), len(grid.cells), cell, evaluate, bench, error)
    log.finish(failed)
    report = pareto_report(sweep.name, log.run_id)
    print("\nPareto front (* = on the front, x = violates a constraint):\n" + report["table"], flush=True)
    print(f"\nfarm: {len(grid.cells) - failed} cells finished, {failed} failed, in {time.time() - t0:.0f} s",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
