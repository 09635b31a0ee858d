"""The sweep driver: with farm/run/cluster.py, the only code that imports ray.

Validate the sweep, expand the grid, then submit one Ray task per stage; a stage's dependencies are passed as
ObjectRefs of their small result dicts (paths in storage, never weights). Stages of an EXCLUSIVE kind (benchmarks)
take every CPU of their node plus its `bench_slot` and a label selector per target (farm/run/cluster.py). A cell
is logged to MLflow as soon as its single-stream measurements finish; a failed cell becomes a FAILED run with its
traceback and the sweep goes on. Then each later phase (a stage kind with AFTER, farm/stages) picks its cells and
runs; the front is computed once, recorded, and the report drawn from it.

The driver names no stage kind: what it needs of one it reads from the kind's declarations.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import time
from pathlib import Path

import ray

from farm.errors import SpecError, StageError
from farm.inputs import modelref
from farm.plan import grid as gridmod
from farm.run.cluster import check_fits, check_targets, exclusive, release_nodes, running_tasks, strand, task_options
from farm.stages import STAGES
from farm.stages.common import declared, measurements
from farm.stages.runner import run_stage
from farm.sweep import spec as specmod


@ray.remote(max_retries=1, retry_exceptions=False)  # retried once when its worker or node is lost
def stage_task(stage, *deps, memory_limit: int | None = None):
    ctx = ray.get_runtime_context()
    node = {"node_id": ctx.get_node_id(), "job_id": ctx.get_job_id(),
            "node_labels": {k: v for k, v in ctx.get_node_labels().items() if not k.startswith("ray.io/")}}
    if not memory_limit:
        return run_stage(stage, list(deps), node)
    from farm import storage
    from farm.run import memguard

    note = storage.home() / "memguard" / f"{ctx.get_job_id()}-{stage.name}.txt"
    memguard.check_note(note)  # a retry after the guard stopped this stage: fail with the reason
    with memguard.limit(memory_limit, note, f"stage {stage.kind}:{stage.id}"):
        return run_stage(stage, list(deps), node)


def submit(grid, sweep, only: list[str] | None = None, refs: dict | None = None) -> dict:
    """Submit every stage (in topological order) but those of a later phase's kinds; with `only`, just those
    stages, whose dependencies are in `refs` already (a later phase)."""
    bench_cpus = check_targets(sweep)
    model_bytes = modelref.base_bytes(sweep.base.model)
    stage_memory = int(sweep.stage_memory_gb * 2**30) if sweep.stage_memory_gb else None
    later = set(measurements(after=True))
    refs = dict(refs or {})
    todo = [(sid, stage, task_options(stage, bench_cpus, model_bytes, sweep.base.trust_remote_code, stage_memory,
                                      sweep.stage_cpus))
            for sid, stage in grid.stages.items()  # insertion order is topological
            if (only is None and stage.kind not in later) or (only is not None and sid in only)]
    why = "stage_memory_gb" if stage_memory else "three copies of the base model"
    check_fits({(o["num_cpus"], o["memory"]): f"stage {st.kind} ({why})" for _, st, o in todo if "memory" in o})
    for sid, stage, opts in todo:
        limit = stage_memory if not exclusive(stage.kind) else None  # a measurement owns its node
        refs[sid] = stage_task.options(**opts).remote(stage, *[refs[d] for d in stage.deps], memory_limit=limit)
    return refs


def print_cell(done: int, total: int, cell, results: dict, error) -> None:
    from farm.record.cells import cell_label
    from farm.sweep.metrics import vocabulary

    label = cell_label(cell)
    if error is not None:
        print(f"[{done}/{total}] {label}: FAILED: {str(error).splitlines()[0][:300]}", flush=True)
        return
    m = {k: v for r in results.values() for k, v in r["metrics"].items()}
    shown = "  ".join(f"{x.short} {m[x.name]:{x.fmt}}{' ' + x.unit if x.unit else ''}"
                      for _, x in vocabulary() if x.short and x.name in m)
    dirty = any(r.get("contaminated") for r in results.values())
    print(f"[{done}/{total}] {label}: {shown}{'  (CONTAMINATED: other load on the node)' if dirty else ''}",
          flush=True)


def unwrap(error: BaseException) -> BaseException:
    """The stage's own exception, without Ray's wrapper (whose text starts with Ray's boilerplate:
    'ray::bench:5c64... (pid=..., ip=...)')."""
    while isinstance(error, ray.exceptions.RayTaskError) and getattr(error, "cause", None) is not None:
        error = error.cause
    if isinstance(error, ray.exceptions.WorkerCrashedError):
        return StageError("the Ray worker running this stage died (a native crash or a kill outside farm's "
                          "child processes); its log is in the Ray session's logs/worker-*.err")
    return error


def _outcome(fut):
    """(result, None) or (None, the stage's error) of a finished stage's future."""
    try:
        return fut.result(), None
    except Exception as e:  # a failed stage, or one whose dependency failed, or one cancelled
        return None, unwrap(e)


def exit_code(finished: int, failed: int, later_failed: int = 0) -> int:
    """0: every cell and every later measurement (tasks, serve) finished; 3: some failed but cells finished (a
    partial sweep, still reported and promotable); 1: no cell finished."""
    if not finished:
        return 1
    return 3 if failed or later_failed else 0


PROGRESS_EVERY_S = 30  # FARM_PROGRESS_S overrides


class Job:
    """One submission as it runs: the grid, every stage's outcome, the MLflow log, and progress lines."""

    def __init__(self, sweep, grid, log, t0: float):
        from farm.run.progress import Progress

        self.sweep, self.grid, self.log, self.t0 = sweep, grid, log, t0
        self.refs: dict = {}
        self.outcome: dict[str, tuple] = {}  # stage id -> (result, error)
        self.job_id = ray.get_runtime_context().get_job_id()
        self.every = float(os.environ.get("FARM_PROGRESS_S", PROGRESS_EVERY_S))
        self.first = measurements(after=False)
        self.progress = Progress(grid, t0)  # the sweep phase's stages

    def report(self, progress, now: float) -> None:
        progress.set_running(running_tasks(self.job_id, self.grid))
        line = progress.line(now)
        print(line, flush=True)
        self.log.progress(line)

    def wait(self, sids: list[str], progress, each, tick=None) -> None:
        """Wait for these submitted stages, each(sid) as each finishes, tick() every few seconds whatever happens;
        a progress line every FARM_PROGRESS_S. Ray calls back as each result arrives (ObjectRef.future): a
        completion costs the same however many stages are still pending."""
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        left = {s for s in sids if s not in self.outcome}
        for sid in left:
            self.refs[sid].future().add_done_callback(lambda fut, sid=sid: arrived.put((sid, fut)))
        last = time.time()
        while left:
            batch = []
            try:
                batch.append(arrived.get(timeout=5))
                while True:
                    batch.append(arrived.get_nowait())
            except queue.Empty:
                pass
            for sid, fut in batch:
                left.discard(sid)
                self.outcome[sid] = result, error = _outcome(fut)
                if error is None:
                    progress.stage_finished(sid, result)
                else:
                    progress.stage_failed(sid)
                each(sid)
            if tick is not None:
                tick()
            now = time.time()
            if now - last >= self.every and left:
                self.report(progress, now)
                last = now

    def sweep_phase(self, refs: dict) -> int:
        """Every stage but the later phases' (submitted: refs); each cell logged once its single-stream
        measurements are done."""
        grid = self.grid
        self.refs = refs
        pending = {cell.id: cell for cell in grid.cells}
        needs = {c.id: {c.stages[k] for k in self.first if k in c.stages} for c in grid.cells}
        readers: dict[str, list] = {}  # stage id -> the cells waiting for it
        for c in grid.cells:
            for sid in needs[c.id]:
                readers.setdefault(sid, []).append(c)
        stranded: dict[str, str] = {}  # cell id -> why a benchmark of it can no longer run anywhere
        failed, last_strand = 0, time.time()

        def log(cell):
            nonlocal failed
            results = {k: self.outcome[c_sid][0] for k in self.first if (c_sid := cell.stages.get(k))}
            errors = [self.outcome[cell.stages[k]][1] for k in self.first if k in cell.stages]
            export, err = self.outcome.get(cell.export, (None, None))
            errors.append(err)
            error = StageError(stranded[cell.id]) if cell.id in stranded else next(
                (e for e in errors if e is not None), None)
            steps = [self.outcome.get(s, (None, None))[0] for s in cell.compress]
            self.log.log_cell(cell, export, {k: r for k, r in results.items() if r is not None}, error=error,
                              steps=steps)
            del pending[cell.id]
            failed += error is not None
            self.progress.cell_logged(error is not None)
            print_cell(len(grid.cells) - len(pending), len(grid.cells), cell, results, error)

        def each(sid):
            for cell in readers.pop(sid, ()):
                needs[cell.id].discard(sid)
                if not needs[cell.id]:
                    log(cell)

        def tick():
            nonlocal last_strand
            now = time.time()
            if now - last_strand > 15:
                waiting = {self.refs[sid]: c for c in pending.values() for k, sid in c.stages.items()
                           if k in self.first and exclusive(k) and sid not in self.outcome}
                strand(waiting, stranded)
                self.log.flush()  # cells queued while MLflow was unreachable
                last_strand = now

        for cell in [c for c in grid.cells if not needs[c.id]]:  # nothing to measure single-stream
            log(cell)
        self.wait(list(self.refs), self.progress, each, tick)
        self.log.progress(self.progress.line())
        return failed

    def later_phases(self) -> None:
        """Each later phase's kind picks its cells from the front so far and runs them (farm/stages/<kind>.py:
        phase); what it measures joins the rows every later phase and the front see."""
        done: set[str] = set()
        extra: dict[str, dict] = {}
        for kind in measurements(after=True):
            section = declared(kind, "SECTION")
            if section and getattr(self.sweep, section, None) is None:
                continue  # the sweep does not ask for it
            STAGES.get(kind).phase(Phase(self, kind, done, extra))
            done.add(kind)


class Phase:
    """What a later phase's kind sees of the job (farm/stages/<kind>.py: phase(ctx)): the grid, the sweep, every
    outcome so far, the front's rows and objectives as far as they are known, a way to run stages with progress
    lines, and the MLflow log."""

    def __init__(self, job: Job, kind: str, done: set[str], extra: dict[str, dict]):
        from farm.decide import pareto

        self.job, self.kind, self.done, self.extra = job, kind, done, extra
        self.grid, self.sweep, self.outcome, self.log = job.grid, job.sweep, job.outcome, job.log
        self.pareto = pareto

    def label(self, cell) -> str:
        from farm.record.cells import cell_label

        return cell_label(cell)

    def say(self, line: str) -> None:
        print(line, flush=True)

    def known(self, metric: str) -> bool:
        """Measured by now: by the sweep phase, or by a later phase that ran before this one."""
        from farm.sweep.metrics import producer

        kind = producer(metric)
        return kind is None or not declared(kind, "AFTER") or kind in self.done

    def objectives(self) -> dict[str, str]:
        """The sweep's objectives measured by now (this phase's own are not: it picks its cells without them)."""
        return {m: d for m, d in self.sweep.objectives.items() if self.known(m)} or {"decode_tok_s": "max"}

    def constraints(self) -> list[dict]:
        """The front's constraints measured by now, and this phase's own (missing until measured: see later)."""
        from farm.sweep.metrics import front_constraints, producer

        return [c for c in front_constraints(self.sweep.model_dump())
                if self.known(c["metric"]) or producer(c["metric"]) == self.kind]

    def later(self):
        """For the front: a later phase's metric that is missing does not exclude a cell unless it failed there."""
        from farm.sweep.metrics import later

        return later()

    def promote_metric(self) -> tuple[str, str]:
        """The promote policy's metric where it is known by now (else decode speed) and its direction."""
        from farm.sweep.metrics import better

        metric = self.sweep.promote.metric if self.known(self.sweep.promote.metric) else "decode_tok_s"
        return metric, self.sweep.objectives.get(metric, better(metric))

    def rows(self) -> list[dict]:
        return finished_rows(self.grid, self.outcome, self.extra)

    def run(self, sids: list[str], each=None) -> None:
        """Run these stages of this phase's kind; each(sid, result, error) as each finishes."""
        from farm.run.progress import Progress

        self.job.refs.update(submit(self.grid, self.sweep, only=sids, refs=self.job.refs))
        progress = Progress(self.grid, time.time(), sids, phase=self.kind)
        self.job.wait(sids, progress, lambda sid: each and each(sid, *self.outcome[sid]))
        self.log.progress(progress.line())


def finished_rows(grid, outcome: dict, extra: dict[str, dict] | None = None) -> list[dict]:
    """The front's rows (farm.record.cells.row) of the cells whose single-stream measurements finished, with what
    later phases measured of them so far and `extra` (cell id -> metrics a phase derived, e.g. its gate)."""
    from farm.record.cells import cell_label, row

    first = measurements(after=False)
    rows = []
    for cell in grid.cells:
        results = [outcome.get(cell.stages[k], (None, 1)) for k in first if k in cell.stages]
        if any(e is not None for _, e in results):
            continue
        metrics, failed = {}, []
        for r, _ in results:
            metrics.update(r["metrics"])
        for kind in measurements(after=True):
            result, error = outcome.get(cell.stages.get(kind), (None, None))
            if error is not None:
                failed.append(kind)
            elif result is not None:
                metrics.update(result.get("metrics") or {})
        metrics.update((extra or {}).get(cell.id, {}))
        host = next((r.get("host", {}) for r, _ in results if r.get("measured_at")), {})
        when = next((r["measured_at"] for r, _ in results if r.get("measured_at")), None)
        rows.append(row(cell.id, cell.params(), cell.baseline, metrics, cell_label(cell),
                        any(r.get("contaminated") for r, _ in results), failed,
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)) if when else "",
                        host.get("hostname", "")))
    return rows


def run(path: str) -> int:
    from farm.decide.report import pareto_report
    from farm.record import outbox

    t0 = time.time()
    if not Path(path).is_file():
        raise SpecError([f"file '{path}' does not exist — give the path of a sweep YAML file"], path)
    text = Path(path).read_text(encoding="utf-8")  # read once: ray.init may change the working directory
    sweep = specmod.loads(text, path)  # raises SpecError before anything is written anywhere
    grid = gridmod.build(sweep)
    if not ray.is_initialized():  # the cluster simulation (benchmarks/simcluster.py) connects first
        ray.init(address="auto", log_to_driver=False)
    refs = submit(grid, sweep)  # check_targets may raise: still nothing written to MLflow
    log = outbox.SweepLog(sweep, grid, text)

    def stopped(signum, frame):  # `ray job stop` sends SIGTERM, Ctrl-C SIGINT
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    print(f"farm: sweep '{sweep.name}': {len(grid.cells)} cells, {len(grid.stages)} stages; "
          f"MLflow run {log.run_id}", flush=True)
    job = Job(sweep, grid, log, t0)
    try:
        failed = job.sweep_phase(refs)
        job.later_phases()
    except BaseException as e:  # stopped, or an error (a full disk): the parent run says so, never RUNNING
        why = f"stopped by signal {e.code - 128}" if isinstance(e, SystemExit) and isinstance(e.code, int) else (
            "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}")
        log.abort(why)
        raise
    log.finish(failed)
    release_nodes()
    report = outbox.while_unreachable("the Pareto front", pareto_report, sweep.name, log.run_id)
    print("\nPareto front (* = on the front, x = violates a constraint):\n" + report["table"], flush=True)
    write_report(sweep.name, log.run_id, report)
    finished = len(grid.cells) - failed
    later_failed = sum(log.later_failed.values())
    code = exit_code(finished, failed, later_failed)
    print(f"\nfarm: {finished} cells finished, {failed} failed, in {time.time() - t0:.0f} s", flush=True)
    if failed or later_failed:
        print(f"farm: {'a partial sweep' if finished else 'nothing finished'}: `farm status {sweep.name}` lists "
              f"what failed and why ({log.outcome(failed)}; exit status {code})", flush=True)
    return code


def write_report(name: str, run_id: str, rep: dict) -> None:
    """The sweep's report (farm/decide/report.py) onto its parent run. A report that cannot be drawn costs the job
    nothing: the cells and the front are in MLflow already, and `farm report NAME` tries again."""
    import tempfile

    from farm.decide.report import build

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


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
