"""The sweep driver: the only module that imports ray.

Validate the sweep, expand the grid, then submit one Ray task per stage; a stage's dependencies are
passed as ObjectRefs of their small result dicts (paths in storage, never weights). Benchmarks take
every CPU of their node plus its `bench_slot`, so nothing else runs beside them, and a label selector
per target. Cells are logged to MLflow as soon as their evaluate and bench stages finish; a failed
cell becomes a FAILED run with its traceback and the sweep goes on.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import ray

from farm import grid as gridmod
from farm import modelref
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


def node_types() -> dict[str, dict]:
    """The node types the cluster's autoscaler can start (available_node_types with max_workers > 0), from
    $FARM_AUTOSCALING_CONFIG, else ~/ray_bootstrap_config.yaml where `ray up` leaves the cluster config on
    the head; none on a fixed cluster."""
    import yaml

    path = Path(os.environ.get("FARM_AUTOSCALING_CONFIG") or "~/ray_bootstrap_config.yaml").expanduser()
    if not path.is_file():
        return {}
    types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types") or {}
    return {name: t for name, t in types.items() if int(t.get("max_workers", 0)) > 0}


def check_targets(sweep) -> dict[str, int]:
    """target name -> CPUs a benchmark there reserves; a target no node satisfies is a SpecError. A target
    only a node type of the autoscaler satisfies (min_workers: 0) is valid: its node is asked for and waited on."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    types = node_types()
    inventory = "\n".join(
        [f"      node {n['NodeID'][:12]}: {n.get('Labels', {})} resources {dict(n['Resources'])}" for n in nodes]
        + [f"      node type {k} (autoscaled): {t.get('labels', {})} resources {t.get('resources', {})}"
           for k, t in types.items()])
    problems, wanted = [], {}
    for i, t in enumerate(sweep.targets):
        if _bench_nodes(t.labels, nodes):
            continue
        startable = [k for k, nt in types.items() if selector_matches(t.labels, nt.get("labels") or {})
                     and (nt.get("resources") or {}).get(BENCH_SLOT, 0) >= 1]
        if startable:
            wanted[t.name] = (t.labels, startable)
        else:
            problems.append(f"targets[{i}] '{t.name}': no alive node with a {BENCH_SLOT}, and no node type the "
                            f"autoscaler can start, matches labels {t.labels}; the cluster has:\n{inventory}")
    if problems:
        raise SpecError(problems, "cluster")
    if wanted:
        scale_up(wanted)
        nodes = [n for n in ray.nodes() if n["Alive"]]
    return {t.name: int(min(n["Resources"].get("CPU", 1) for n in _bench_nodes(t.labels, nodes)))
            for t in sweep.targets}


def _bench_nodes(labels: dict, nodes: list[dict]) -> list[dict]:
    """The alive nodes of `nodes` with a bench slot whose labels satisfy `labels`."""
    return [n for n in nodes if n["Resources"].get(BENCH_SLOT, 0) >= 1 and selector_matches(labels, n.get("Labels", {}))]


SCALE_UP_WAIT_S = 900.0


def scale_up(wanted: dict[str, tuple[dict, list[str]]]) -> None:
    """Ask the autoscaler for one benchmark node per target (a bench slot under the target's labels) and
    wait until each has one. The request stands for the rest of the job, so an idle node is not scaled
    away before its benchmarks are scheduled; the next job's request (or `release_nodes`) replaces it."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{BENCH_SLOT: 1} for _ in wanted],
                      bundle_label_selectors=[dict(labels) for labels, _ in wanted.values()])
    wait = float(os.environ.get("FARM_SCALE_UP_WAIT_S", SCALE_UP_WAIT_S))
    deadline, t0 = time.time() + wait, time.time()
    for name, (labels, types) in wanted.items():
        print(f"farm: target '{name}': no node is up yet; asked the autoscaler for one of type "
              f"{', '.join(types)} (labels {labels}), waiting up to {wait:.0f} s", flush=True)
    while missing := [name for name, (labels, _) in wanted.items()
                      if not _bench_nodes(labels, [n for n in ray.nodes() if n["Alive"]])]:
        if time.time() > deadline:
            raise StageError(f"the autoscaler started no node for target(s) {', '.join(missing)} within {wait:.0f} s "
                             "(FARM_SCALE_UP_WAIT_S); see `ray status` and the autoscaler's log "
                             "(/tmp/ray/session_latest/logs/monitor.*) for why — quota, instance type, max_workers")
        time.sleep(2)
    print(f"farm: autoscaled node(s) up for {', '.join(wanted)} after {time.time() - t0:.0f} s", flush=True)


def release_nodes() -> None:
    """Withdraw this job's standing request for benchmark nodes (the autoscaler may then scale them away)."""
    if node_types():
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])


def task_options(stage, bench_cpus: dict[str, int], model_bytes: int | None, trust_code: bool = False,
                 stage_memory: int | None = None, stage_cpus: int = 1) -> dict:
    """Benchmarks: every CPU of a node that matches the target's labels, plus its bench slot. Other
    stages: the sweep's stage_cpus anywhere (Ray sets OMP_NUM_THREADS to it, and the stage runs that many
    threads), and its stage_memory_gb, else memory for ~3 copies of the float model (load, transform, save)."""
    name = f"{stage.kind}:{stage.id}"
    if trust_code:  # the sweep opted in to the model's own code: only its tasks get the permission
        return {**task_options(stage, bench_cpus, model_bytes, stage_memory=stage_memory, stage_cpus=stage_cpus),
                "runtime_env": {"env_vars": {"FARM_TRUST_REMOTE_CODE": "1"}}}
    if stage.kind in ("bench", "serve"):  # measurements own their node
        target = stage.params["target"]
        opts = {"num_cpus": bench_cpus[target["name"]], "resources": {BENCH_SLOT: 1}, "name": name}
        if target["labels"]:
            opts["label_selector"] = dict(target["labels"])
        return opts
    opts = {"num_cpus": stage_cpus, "name": name}
    if stage_memory:
        opts["memory"] = stage_memory
    elif model_bytes:
        opts["memory"] = 3 * model_bytes + 2**30
    return opts


def submit(grid, sweep, kinds_later: tuple[str, ...] = ("tasks", "serve"), only: list[str] | None = None,
           refs: dict | None = None) -> dict:
    """Submit every stage (in topological order) but those of `kinds_later`; with `only`, just those stages,
    whose dependencies are in `refs` already (the tasks and serve phases, after the bench phase)."""
    bench_cpus = check_targets(sweep)
    model_bytes = modelref.base_bytes(sweep.base.model)
    stage_memory = int(sweep.stage_memory_gb * 2**30) if sweep.stage_memory_gb else None
    refs = dict(refs or {})
    for sid, stage in grid.stages.items():  # insertion order is topological
        if (only is None and stage.kind in kinds_later) or (only is not None and sid not in only):
            continue
        opts = task_options(stage, bench_cpus, model_bytes, sweep.base.trust_remote_code, stage_memory,
                            sweep.stage_cpus)
        limit = stage_memory if stage.kind not in ("bench", "serve") else None  # a measurement owns its node
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


def unwrap(error: BaseException) -> BaseException:
    """The stage's own exception, without Ray's wrapper (whose text starts with Ray's boilerplate:
    'ray::bench:5c64... (pid=..., ip=...)')."""
    while isinstance(error, ray.exceptions.RayTaskError) and getattr(error, "cause", None) is not None:
        error = error.cause
    if isinstance(error, ray.exceptions.WorkerCrashedError):
        return StageError("the Ray worker running this stage died (a native crash or a kill outside farm's "
                          "child processes); its log is in the Ray session's logs/worker-*.err")
    return error


def _get(ref):
    try:
        return ray.get(ref), None
    except Exception as e:  # a failed stage, or one whose dependency failed
        return None, unwrap(e)


def running_tasks(job_id: str, grid) -> dict[str, str] | None:
    """stage id -> node, for this job's RUNNING tasks (Ray's state API; None if it cannot answer in time)."""
    try:
        from ray.util.state import list_tasks

        tasks = list_tasks(filters=[("job_id", "=", job_id), ("state", "=", "RUNNING")], limit=1000,
                           raise_on_missing_output=False, timeout=10)
        names = {n["NodeID"]: n.get("Labels", {}).get("farm/node") or n["NodeManagerAddress"] for n in ray.nodes()}
    except Exception:  # noqa: BLE001 (progress is informative; the sweep goes on without it)
        return None
    out = {}
    for t in tasks:
        sid = (t.name or "").partition(":")[2]
        if sid in grid.stages:
            out[sid] = names.get(t.node_id, (t.node_id or "?")[:8])
    return out


def exit_code(finished: int, failed: int) -> int:
    """0: every cell finished; 3: some failed but others finished (a partial sweep, still reported and
    promotable); 1: no cell finished."""
    if not failed:
        return 0
    return 3 if finished else 1


PROGRESS_EVERY_S = 30  # FARM_PROGRESS_S overrides


def run(path: str) -> int:
    from farm import tracking
    from farm.progress import Progress
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
    job_id = ray.get_runtime_context().get_job_id()
    progress = Progress(grid, t0)
    stage_of = {ref: sid for sid, ref in refs.items()}
    outcome: dict[str, tuple] = {}  # stage id -> (result, error)
    pending = {cell.id: cell for cell in grid.cells}
    stranded: dict[str, str] = {}  # cell id -> why its benchmark can no longer run anywhere
    failed, last_print, last_strand = 0, time.time(), time.time()
    every = float(os.environ.get("FARM_PROGRESS_S", PROGRESS_EVERY_S))
    while pending:
        left = [r for r, sid in stage_of.items() if sid not in outcome]
        ready, _ = ray.wait(left, num_returns=1, timeout=5) if left else ([], [])
        if ready:
            rest = [r for r in left if r not in ready]
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0] if rest else []
        for ref in ready:
            sid = stage_of[ref]
            outcome[sid] = _get(ref)
            result, error = outcome[sid]
            if error is None:
                progress.stage_finished(sid, result)
            else:
                progress.stage_failed(sid)
        for cell in [c for c in pending.values() if c.bench in outcome and c.evaluate in outcome]:
            bench, err = outcome[cell.bench]
            evaluate, err2 = outcome[cell.evaluate]
            export, err3 = outcome.get(cell.export, (None, None))
            error = StageError(stranded[cell.id]) if cell.id in stranded else (err or err2 or err3)
            steps = [outcome.get(s, (None, None))[0] for s in cell.compress]
            log.log_cell(cell, export, evaluate, bench, error=error, steps=steps)
            del pending[cell.id]
            failed += error is not None
            progress.cell_logged(error is not None)
            print_cell(len(grid.cells) - len(pending), len(grid.cells), cell, evaluate, bench, error)
        now = time.time()
        if now - last_strand > 15:
            waiting = {refs[c.bench]: c for c in pending.values() if c.bench not in outcome}
            strand(waiting, stranded)
            log.flush()  # cells queued while MLflow was unreachable
            last_strand = now
        if pending and now - last_print >= every:
            progress.set_running(running_tasks(job_id, grid))
            line = progress.line(now)
            print(line, flush=True)
            log.progress(line)
            last_print = now
    log.progress(progress.line())
    if sweep.tasks is not None:
        tasks_phase(grid, sweep, refs, outcome, log)
    if sweep.serve is not None:
        serve_phase(grid, sweep, refs, outcome, log)
    log.finish(failed)
    release_nodes()
    report = tracking.while_unreachable("the Pareto front", pareto_report, sweep.name, log.run_id)
    print("\nPareto front (* = on the front, x = violates a constraint):\n" + report["table"], flush=True)
    write_report(sweep.name, log.run_id, report)
    finished = len(grid.cells) - failed
    code = exit_code(finished, failed)
    print(f"\nfarm: {finished} cells finished, {failed} failed, in {time.time() - t0:.0f} s", flush=True)
    if failed:
        print(f"farm: {'a partial sweep' if finished else 'nothing finished'}: `farm status {sweep.name}` lists "
              f"the failed cells and why (exit status {code})", flush=True)
    return code


def write_report(name: str, run_id: str, rep: dict) -> None:
    """The sweep's report (farm/report.py) onto its parent run. A report that cannot be drawn costs the job
    nothing: the cells and the front are in MLflow already, and `farm report NAME` tries again."""
    import tempfile

    from farm.report import build

    try:
        with tempfile.TemporaryDirectory() as d:
            out = build(name, Path(d), run_id, rep)
        bad = [k for k in out["checks"] if not k["ok"]]
        print(f"farm: the sweep's report is report.html in parent run {run_id} ({len(out['checks'])} ordering "
              f"checks, {len(bad)} failed{': ' + '; '.join(k['check'] + ' (' + k['cells'] + ')' for k in bad) if bad else ''})",
              flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"farm: WARNING: the sweep's report could not be written ({type(e).__name__}: {e}); "
              f"`farm report {name}` tries again", flush=True)


def finished_rows(grid, outcome: dict, consistency: dict | None = None) -> list[dict]:
    """Pareto rows of the cells whose evaluate and bench stages finished, with their task accuracy where it was
    scored (and the gate's agreement of their runtime, `consistency`: cell id -> share)."""
    from farm.tracking import cell_label

    rows = []
    for cell in grid.cells:
        (ev, e1), (be, e2) = outcome.get(cell.evaluate, (None, 1)), outcome.get(cell.bench, (None, 1))
        if e1 is not None or e2 is not None:
            continue
        row = {"id": cell.id, "target": cell.spec["target"]["name"], "baseline": cell.baseline,
               "metrics": {**ev["metrics"], **be["metrics"]}, "label": cell_label(cell),
               "contaminated": bool(be.get("contaminated"))}
        if cell.tasks in outcome:
            result, error = outcome[cell.tasks]
            row["failed_later"] = error is not None
            row["metrics"].update(result["metrics"] if error is None else {})
        if consistency and cell.id in consistency:
            row["metrics"]["task_consistency"] = consistency[cell.id]
        rows.append(row)
    return rows


def gate_cells(grid) -> list:
    """The cells the consistency gate compares with the PyTorch baseline: each runtime's base model at its
    format's full-precision level (gguf F16, onnx/openvino fp32, ...), and the baseline itself."""
    from farm.export import FORMATS

    return [c for c in grid.cells if c.tasks and (c.baseline or not c.spec["compress"] and
            c.spec["export"]["quant"] == FORMATS.options(c.spec["export"]["format"]).BASE_LEVEL)]


def task_result(outcome: dict, cell) -> dict | None:
    """The cell's task-accuracy result, if its tasks stage ran and did not fail."""
    result, error = outcome.get(cell.tasks, (None, 1))
    return result if error is None else None


def consistency_of(grid, outcome: dict) -> tuple[dict[str, float], list[str]]:
    """cell id -> the share of items on which its runtime setting's full-precision base cell picked the PyTorch
    baseline's answer (the lowest, if it has several), for every scored cell; and a line per runtime setting."""
    import json

    from farm.tasks import agreement
    from farm.tracking import cell_label

    def setting(c) -> str:
        return json.dumps(c.spec["export"]["runtime"], sort_keys=True)

    baseline = next((task_result(outcome, c) for c in grid.cells if c.baseline and c.tasks), None)
    if baseline is None:
        return {}, ["farm: tasks: the PyTorch baseline has no task scores; no runtime is checked against it"]
    share, lines = {}, []
    for c in gate_cells(grid):
        mine = task_result(outcome, c)
        if mine is None:
            continue
        value, n = agreement(mine["items"], baseline["items"])
        share[setting(c)] = min(value, share.get(setting(c), 1.0))
        if not c.baseline:
            lines.append(f"farm: tasks: {cell_label(c)} picks the PyTorch baseline's answer on {100 * value:.1f} % "
                         f"of {n} items")
    return {c.id: share[setting(c)] for c in grid.cells if c.tasks in outcome and setting(c) in share}, lines


def vs_base(grid, outcome: dict) -> dict[str, dict[str, float]]:
    """cell id -> `acc_vs_base.<task>` and `acc_vs_base_stderr.<task>`: the paired difference (farm.tasks.paired)
    between the cell's accuracy and that of the uncompressed base model exported the same way (same format,
    level, runtime and target), for every scored cell with a compression and such a twin."""
    import json

    from farm.tasks import paired

    def key(c) -> str:
        return json.dumps([c.spec["export"], c.spec["target"]["name"]], sort_keys=True, default=str)

    twins = {key(c): task_result(outcome, c) for c in grid.cells
             if not c.spec["compress"] and task_result(outcome, c) is not None}
    out = {}
    for c in grid.cells:
        mine, base = task_result(outcome, c), twins.get(key(c))
        if not c.spec["compress"] or mine is None or base is None:
            continue
        for t in mine["items"]:
            d = paired(mine["items"][t], base["items"].get(t, {"doc_ids": []}))
            if d is not None:
                out.setdefault(c.id, {}).update({f"acc_vs_base.{t}": d[0], f"acc_vs_base_stderr.{t}": d[1]})
    return out


def tasks_phase(grid, sweep, refs: dict, outcome: dict, log) -> None:
    """After every cell has its single-stream numbers: task accuracy of every cell (tasks.cells 'all'), or of
    the gate's cells, the Pareto front (and with 'format_front' each runtime's own best cells), then again
    until every cell on the front has been scored (a task constraint can drop a front cell and let in one
    that was dominated by it)."""
    from farm import pareto
    from farm.spec import better, front_constraints, is_serve_metric, is_task_metric
    from farm.tracking import cell_label

    spec = sweep.model_dump()
    objectives = {m: d for m, d in sweep.objectives.items() if not is_serve_metric(m)} or {"decode_tok_s": "max"}
    constraints = [c for c in front_constraints(spec) if not is_serve_metric(c["metric"])]
    rows = finished_rows(grid, outcome)
    finished = {r["id"] for r in rows}
    first = {c.id for c in gate_cells(grid)}
    if sweep.tasks.cells == "format_front":  # each runtime's own best cells, whether or not on the sweep's front
        metric = sweep.promote.metric if not is_serve_metric(sweep.promote.metric) else "decode_tok_s"
        first |= set(pareto.served(rows, {c.id: c.spec["export"]["runtime"]["name"] for c in grid.cells},
                                   objectives, constraints, "format_front", sweep.tasks.per_runtime, metric,
                                   sweep.objectives.get(metric, better(metric)), later=is_task_metric))
    first |= {i for i, st in pareto.front(rows, objectives, constraints, later=is_task_metric).items() if st["pareto"]}
    todo = [c for c in grid.cells if c.id in finished and (sweep.tasks.cells == "all" or c.id in first)]
    seen: set[str] = set()
    while todo:
        todo = [c for c in todo if c.tasks not in seen]
        stages = list(dict.fromkeys(c.tasks for c in todo))
        if not stages:
            break
        print(f"\nfarm: tasks ({', '.join(f'{t} {n}' for t, n in sweep.tasks.items.items())} items) on "
              f"{len(stages)} runtime setting(s) of {len(todo)} cell(s): "
              f"{', '.join(cell_label(c) for c in todo)}", flush=True)
        refs.update(submit(grid, sweep, only=stages, refs=refs))
        for sid in stages:
            outcome[sid] = _get(refs[sid])
            seen.add(sid)
        if sweep.tasks.cells == "all":
            break
        rows = finished_rows(grid, outcome, consistency_of(grid, outcome)[0])
        status = pareto.front(rows, objectives, constraints, later=is_task_metric)
        todo = [c for c in grid.cells if c.id in status and status[c.id]["pareto"] and c.tasks not in seen]
    consistency, lines = consistency_of(grid, outcome)
    for line in lines:
        print(line, flush=True)
    paired = vs_base(grid, outcome)
    threshold = sweep.tasks.consistency
    for cell in grid.cells:
        if cell.tasks not in outcome or cell.id not in finished:
            continue
        result, error = outcome[cell.tasks]
        if error is None and cell.id in paired:
            result = {**result, "metrics": {**result["metrics"], **paired[cell.id]}}
        log.log_tasks(cell, result, error, consistency.get(cell.id))
        label = cell_label(cell)
        if error is not None:
            print(f"farm: tasks {label}: FAILED: {str(error).splitlines()[0][:300]}", flush=True)
            continue
        m = result["metrics"]
        gate = consistency.get(cell.id)
        vs = {t: f" ({m[f'acc_vs_base.{t}']:+.3f}±{m[f'acc_vs_base_stderr.{t}']:.3f} vs the base, paired)"
              for t in sweep.tasks.items if f"acc_vs_base.{t}" in m}
        print(f"farm: tasks {label}: " + "  ".join(f"{t} {m[f'acc.{t}']:.3f}±{m[f'acc_stderr.{t}']:.3f}{vs.get(t, '')}"
                                                   for t in sweep.tasks.items)
              + f"  mean {m['task_acc_mean']:.3f}  ({m['task_s_per_item']:.2f} s/item)"
              + (f"  FAILS THE CONSISTENCY GATE ({100 * gate:.1f} % < {100 * threshold:.0f} % agreement with "
                 "PyTorch): kept off the front" if gate is not None and gate < threshold else ""), flush=True)


def serve_phase(grid, sweep, refs: dict, outcome: dict, log) -> None:
    """After every cell has its single-stream numbers: the serve benchmark of the cells sweep.serve picks,
    one at a time per node like every benchmark, each logged to its cell's run (curves over concurrency)."""
    from farm import pareto
    from farm.serve import bench as servebench
    from farm.spec import better, front_constraints, is_serve_metric, is_task_metric
    from farm.tracking import cell_label

    consistency = consistency_of(grid, outcome)[0] if sweep.tasks is not None else {}
    rows = finished_rows(grid, outcome, consistency)
    finished = {r["id"] for r in rows}
    runtime_of = {c.id: c.spec["export"]["runtime"]["name"] for c in grid.cells if c.serve and c.id in finished}

    def known(m: str) -> bool:  # serve metrics are what this phase measures: not yet known
        return not is_serve_metric(m)

    named = [m for m in dict.fromkeys(sweep.metrics_used()) if not known(m)]
    metric = sweep.promote.metric if known(sweep.promote.metric) else "decode_tok_s"
    chosen = pareto.served(rows, runtime_of, {m: d for m, d in sweep.objectives.items() if known(m)} or
                           {"decode_tok_s": "max"}, [c for c in front_constraints(sweep.model_dump()) if known(c["metric"])],
                           sweep.serve.cells, sweep.serve.per_runtime, metric,
                           sweep.objectives.get(metric, better(metric)), later=is_task_metric)
    cells = [c for c in grid.cells if c.id in chosen]
    if not cells:
        print("farm: serve: no finished cell with a serving engine qualifies; nothing served", flush=True)
        return
    print(f"\nfarm: serve benchmark ({sweep.serve.cells}, concurrency {sweep.serve.concurrency}) of {len(cells)} "
          f"cell(s): {', '.join(cell_label(c) for c in cells)}", flush=True)
    refs.update(submit(grid, sweep, only=[c.serve for c in cells], refs=refs))
    curves = {}
    for cell in cells:
        result, error = _get(refs[cell.serve])
        label = cell_label(cell)
        log.log_serve(cell, result, error, named)
        if error is not None:
            print(f"farm: serve {label}: FAILED: {str(error).splitlines()[0][:300]}", flush=True)
            continue
        curves[label] = result["serve"]
        print(f"farm: serve {label} ({result['serve']['engine']}, {result['serve']['threads']} threads):\n"
              + servebench.table(result["serve"]), flush=True)
    log.log_serve_summary(curves)


DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


def submit_job(path: str, address: str | None = None, wait: bool = True, working_dir: str = ".") -> int:
    """`farm submit FILE`: validate the sweep here, then submit `python -m farm run FILE` as a Ray job with
    the working directory and the farm's environment (FARM_*, MLFLOW_TRACKING_URI), follow its log, and
    return its exit status (0, or 3 for a partial sweep, see exit_code). What `ray job submit
    --address ... --working-dir . --runtime-env-json ... -- python -m farm run FILE` does by hand."""
    import asyncio

    from ray.job_submission import JobStatus, JobSubmissionClient

    specmod.load(path)  # a bad sweep fails here, before anything is uploaded
    token = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.path.isfile(token):
        raise StageError(f"no Ray cluster token in {token}: clusters/local/up.sh makes one for a local cluster; "
                         "for another cluster copy its token there, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH")
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD
    env = {k: v for k, v in os.environ.items() if k.startswith("FARM_") or k == "MLFLOW_TRACKING_URI"}
    client = JobSubmissionClient(address)
    job = client.submit_job(entrypoint=f"python -m farm run {path}",
                            runtime_env={"working_dir": working_dir, "env_vars": env})
    print(f"farm: submitted {path} as Ray job {job} to {address}; `ray job logs {job}` shows its log, "
          f"`farm status` its cells", flush=True)
    if not wait:
        return 0

    async def follow():
        async for lines in client.tail_job_logs(job):
            print(lines, end="", flush=True)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        print(f"\nfarm: stopped following; the job goes on (`ray job stop {job}` stops it)", flush=True)
        return 130
    info = client.get_job_info(job)
    code = getattr(info, "driver_exit_code", None)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    return int(code) if code else 1


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
