"""Everything farm writes to or reads from MLflow (the only module that imports mlflow, with promote).

One experiment per sweep (named after the sweep), one parent run per submission, one child run per
cell with the cell's flattened spec as params, the same metric names for every runtime, the node's
labels and library versions as tags, and the cell spec + raw benchmark JSON as artifacts.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from farm import nodes, storage
from farm.errors import FarmError
from farm.spec import step_label

DEFAULT_URI = "http://127.0.0.1:5000"


def client() -> MlflowClient:
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # fail over to farm's outbox in seconds rather than block the sweep in the client's own ~4 min retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _write(dirpath: Path, name: str, obj) -> Path:
    p = dirpath / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1, default=str))
    return p


class SweepLog:
    """The parent run of one submission, and its child runs.

    Every write goes through an outbox on local disk ($FARM_HOME/outbox/<parent run>/, one JSON record
    per cell, written atomically before delivery) and is delivered in order; a record leaves the outbox
    only once MLflow has all of it. While the server is unreachable records queue up and the sweep goes
    on; `flush` is retried as the sweep runs, and `finish` waits for the server (FARM_TRACKING_WAIT_S,
    default 3600 s). What is still queued after that stays on disk: `farm sync` delivers it later.
    Redelivery is idempotent: a record remembers its run id, and a retry first looks the run up by
    parent and cell id, so a request whose reply was lost does not create a second run.
    """

    def __init__(self, sweep, grid, source_text: str):
        self.c = client()
        deadline = time.time() + wait_limit()
        submission, tried = uuid.uuid4().hex, False
        while True:  # the parent run is needed before anything else: wait for the server here
            try:
                exp = self.c.get_experiment_by_name(sweep.name)
                self.experiment_id = exp.experiment_id if exp else self.c.create_experiment(sweep.name)
                found = self.c.search_runs([self.experiment_id], f"tags.`farm.submission` = '{submission}'",
                                           max_results=1) if tried else []  # a lost reply: the run exists
                tried = True
                run = found[0] if found else self.c.create_run(
                    self.experiment_id, run_name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                    tags={"farm.kind": "sweep", "farm.sweep": sweep.name, "farm.submission": submission})
                break
            except Exception as e:
                if time.time() > deadline:
                    raise FarmError(f"MLflow at {mlflow.get_tracking_uri()} is unreachable: {e}") from e
                print(f"farm: MLflow unreachable ({str(e).splitlines()[0][:120]}); retrying", flush=True)
                time.sleep(10)
        self.run_id = run.info.run_id
        self.n_cells = len(grid.cells)
        self.outbox = storage.home() / "outbox" / self.run_id
        self.seq = 0
        self._queue({"op": "run", "run_id": self.run_id, "status": None,
                     "params": {"sweep.name": sweep.name, "sweep.cells": str(len(grid.cells)),
                                "sweep.stages": str(len(grid.stages))},
                     "files": {"sweep.yaml": source_text, "sweep.json": sweep.model_dump(mode="json"),
                               "grid.json": {"stages": [st.__dict__ for st in grid.stages.values()],
                                             "cells": [c.__dict__ for c in grid.cells]}}})

    def log_cell(self, cell, export: dict | None, evaluate: dict | None, bench: dict | None,
                 error: BaseException | None = None, error_text: str | None = None,
                 steps: list[dict | None] = ()) -> int:
        """Queue the cell's run and try to deliver; returns how many records still wait for MLflow.
        `steps`: the results of the cell's compression steps, in order (what each did; training curves)."""
        return self._queue(cell_record(self.experiment_id, self.run_id, cell, export, evaluate, bench,
                                       error, error_text, steps))

    def log_serve(self, cell, result: dict | None, error: BaseException | None, scalars: list[str] = ()) -> int:
        """The cell's serve benchmark, into its run: metrics whose step is the concurrency (MLflow draws curves),
        the raw levels, a table and a latency-vs-throughput plot; a failure as farm.serve.error."""
        record = {"op": "serve", "experiment_id": self.experiment_id, "parent_id": self.run_id,
                  "cell_id": cell.id, "label": cell_label(cell), "error": None, "result": None,
                  "scalars": list(scalars)}  # serve_*_cN metrics the sweep's objectives/constraints name
        if error is not None:
            record["error"] = (str(error) or type(error).__name__)[:4000]
            record["report"] = getattr(error, "report", "") or "".join(traceback.format_exception(error))
        else:
            record["result"] = result["serve"]
            record["stage"] = result.get("stage", "")
        return self._queue(record)

    def log_tasks(self, cell, result: dict | None, error: BaseException | None, consistency: float | None) -> int:
        """The cell's task accuracy, into its run: acc/acc_norm/stderr/items per task, the mean, the cost per
        item, the consistency gate's agreement of its runtime; the per-item answers as tasks.json."""
        record = {"op": "tasks", "experiment_id": self.experiment_id, "parent_id": self.run_id,
                  "cell_id": cell.id, "label": cell_label(cell), "error": None, "result": None}
        if error is not None:
            record["error"] = (str(error) or type(error).__name__)[:4000]
            record["report"] = getattr(error, "report", "") or "".join(traceback.format_exception(error))
        else:
            metrics = dict(result["metrics"])
            if consistency is not None:
                metrics["task_consistency"] = consistency
            record["result"] = {"metrics": metrics, "items": result["items"], "cost": result["cost"],
                                "stage": result.get("stage", ""), "cached": result.get("cached", False)}
        return self._queue(record)

    def log_serve_summary(self, curves: dict[str, dict]) -> int:
        """Every served cell's curves in one plot and table, on the parent run."""
        if not curves:
            return 0
        return self._queue({"op": "serve_summary", "run_id": self.run_id, "curves": curves})

    def progress(self, line: str) -> None:
        """The sweep's progress as a tag of its parent run (`farm status` shows it). Best effort: not queued,
        the next line replaces it anyway."""
        try:
            self.c.set_tag(self.run_id, "farm.progress", line[:4000])
        except Exception:  # noqa: BLE001, S110 (MLflow unreachable: the outbox holds what matters)
            pass

    def abort(self, reason: str) -> None:
        """The submission was stopped: its finished cells stay, the parent run says KILLED and why.
        Resubmitting the sweep reuses every finished stage and logs a complete new parent run."""
        self._queue({"op": "run", "run_id": self.run_id, "tags": {"farm.stopped": reason}, "status": "KILLED"})

    def finish(self, failed: int) -> None:
        """The parent run FINISHED when any cell finished (a partial sweep still has a front to show: farm.outcome
        says how many failed), FAILED only when every cell failed."""
        total = self.n_cells
        outcome = "complete" if not failed else ("failed" if failed >= total else f"partial: {failed} of {total} "
                                                 "cells failed (`farm status` lists why)")
        self._queue({"op": "run", "run_id": self.run_id, "metrics": {"cells_failed": failed},
                     "tags": {"farm.outcome": outcome}, "status": "FAILED" if failed >= total else "FINISHED"})
        deadline = time.time() + wait_limit()
        while (left := self.flush()) and time.time() < deadline:
            print(f"farm: MLflow unreachable; {left} record(s) wait in {self.outbox}", flush=True)
            time.sleep(10)
        if left:
            raise FarmError(f"MLflow at {mlflow.get_tracking_uri()} stayed unreachable; {left} record(s) are kept "
                            f"in {self.outbox} — run `farm sync` once it is back")

    def _queue(self, record: dict) -> int:
        self.seq += 1
        storage.atomic_write_text(self.outbox / f"{self.seq:06d}.json", json.dumps(record, default=str))
        return self.flush()

    def flush(self) -> int:
        return deliver_outbox(self.c, self.outbox)


def wait_limit() -> float:
    return float(os.environ.get("FARM_TRACKING_WAIT_S", "3600"))


def step_metrics(steps: list[dict | None]) -> tuple[dict[str, float], dict[str, list]]:
    """What the cell's compression steps did, as MLflow metrics: each step's numeric info as
    '<method>.<key>' ('<method>_2.<key>' for a second step of the same method), and its training curve as
    histories '<method>.train_loss' / '<method>.val_loss' ([step, value] pairs)."""
    scalars: dict[str, float] = {}
    history: dict[str, list] = {}
    seen: dict[str, int] = {}
    for result in steps:
        if not result:
            continue
        method = result.get("params", {}).get("step", {}).get("method", "step")
        seen[method] = seen.get(method, 0) + 1
        name = method if seen[method] == 1 else f"{method}_{seen[method]}"  # MLflow names allow no '#'
        info = result.get("info") or {}
        scalars.update({f"{name}.{k}": float(v) for k, v in info.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for key, points in (info.get("curve") or {}).items():
            pairs = [p if isinstance(p, list) else [i, p] for i, p in enumerate(points, 1)]
            history[f"{name}.{key}"] = [[int(st), float(v)] for st, v in pairs]
    return scalars, history


def step_adapters(steps: list[dict | None]) -> dict[str, Path]:
    """The unmerged adapters the cell's compression steps kept for llama.cpp (an sft step's adapter GGUF), by
    the folder of the cell's run they go to: 'adapter' ('adapter_2' for a second such step)."""
    out: dict[str, Path] = {}
    for result in steps:
        rel = ((result or {}).get("info") or {}).get("adapter_gguf")
        if rel and result.get("model_dir"):
            out["adapter" if not out else f"adapter_{len(out) + 1}"] = Path(result["model_dir"]).parent / rel
    return out


def cell_record(experiment_id: str, parent_id: str, cell, export: dict | None, evaluate: dict | None,
                bench: dict | None, error: BaseException | None, error_text: str | None,
                steps: list[dict | None] = ()) -> dict:
    """Everything a cell's run holds, as plain JSON (so it can wait on disk for the server)."""
    label = cell_label(cell)
    tags = {"mlflow.parentRunId": parent_id, "farm.kind": "cell", "farm.cell_id": cell.id,
            "farm.baseline": str(cell.baseline).lower(), "farm.label": label}
    metrics, history = step_metrics(list(steps))
    for result in (evaluate, bench):
        metrics.update({k: float(v) for k, v in ((result or {}).get("metrics") or {}).items()})
    if export:
        tags.update({"farm.artifact_uri": storage.uri_of(export["artifact"]),
                     "farm.artifact_format": export["format"], "farm.artifact_sha256": export.get("sha256", ""),
                     "farm.artifact_runtime": json.dumps(cell.spec["export"]["runtime"], sort_keys=True),
                     "farm.export_stage": export.get("stage", "")})
        pins = export.get("pins") or {}  # a remote store: the manifests promote fetches against
        for tag, stage in (("farm.export_manifest", export.get("stage")),
                           ("farm.artifact_manifest", storage.stage_of(export["artifact"]))):
            if pins.get(stage):
                tags[tag] = pins[stage]
    for kind, result in (("export", export), ("evaluate", evaluate), ("bench", bench)):
        if result:  # reused from an earlier submission (same content id) rather than run again
            tags[f"farm.cached.{kind}"] = str(result.get("cached", False)).lower()
    if bench:
        host = bench.get("host", {})
        # the labels of the Ray node it ran on (those the label selector matched); else this machine's
        labels = bench.get("node_labels") or (nodes.labels(host) if host else {})
        tags.update({f"farm.node.{k}": v for k, v in labels.items()})
        tags.update({"farm.cpu_model": host.get("model_name", ""), "farm.isa": host.get("isa", ""),
                     "farm.hostname": host.get("hostname", ""), "farm.node_id": bench.get("node_id", ""),
                     "farm.bench.contaminated": str(bench.get("contaminated")).lower(),
                     "farm.bench.threads": str(bench.get("threads")),
                     "farm.bench.pinning": str(bench.get("pinning", "compact")),
                     "farm.bench.stage": str(bench.get("stage", ""))})
        if len(bench.get("thread_levels") or []) > 1:
            tags["farm.bench.thread_levels"] = ",".join(map(str, bench["thread_levels"]))
        if bench.get("measured_at"):  # when, beside where (farm.hostname) and under what load (foreign_cpus)
            tags["farm.bench.measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bench["measured_at"]))
        tags.update({f"farm.version.{k}": v for k, v in bench.get("versions", {}).items()})
        tags.update({f"farm.runtime.{k}": v for k, v in bench.get("runtime_settings", {}).items()})
    files = {"cell_spec.json": {"id": cell.id, "baseline": cell.baseline, **cell.spec},
             "stages.json": {k: v for k, v in (("export", export), ("evaluate", evaluate), ("bench", bench)) if v}}
    raw = _bench_json(bench)
    if raw is not None:
        files["bench.json"] = raw.read_text()
    elif bench:  # the raw repeats are what the medians come from: a run without them says so
        tags["farm.bench.raw_missing"] = "true"
        print(f"farm: WARNING: {label}: the benchmark's raw bench.json is gone from storage; its run is flagged "
              "farm.bench.raw_missing=true", flush=True)
    adapters = {d: str(p) for d, p in step_adapters(list(steps)).items() if p.is_file()}
    for d, p in adapters.items():  # `farm serve --lora runs:/RUN/adapter/adapter-f16.gguf` (or models:/...)
        tags[f"farm.{d}"] = f"{d}/{Path(p).name}"
        tags[f"farm.{d}_sha256"] = storage.sha256(Path(p))
    failed = error is not None or bool(error_text)
    if failed:
        text = error_text or ((getattr(error, "report", "") or "") + "\n\n--- traceback ---\n"
                              + "".join(traceback.format_exception(error))).lstrip()
        files["error.txt"] = text
        tags["farm.error"] = (str(error) if error else text.splitlines()[-1])[:4000]
    return {"op": "cell", "experiment_id": experiment_id, "parent_id": parent_id, "cell_id": cell.id,
            "run_name": label, "run_id": None, "attempts": 0, "tags": {k: str(v) for k, v in tags.items()},
            "params": {k: v[:6000] for k, v in cell.params().items()}, "metrics": metrics, "files": files,
            "artifacts": adapters,
            "history": history, "logged_at": int(time.time() * 1000), "status": "FAILED" if failed else "FINISHED"}


def while_unreachable(what: str, fn, *args):
    """fn(*args), tried again every 10 s while MLflow is unreachable or answers 5xx (up to FARM_TRACKING_WAIT_S):
    what a job reads and writes in MLflow after its records are delivered (the front, its tags) survives a server
    restart as the records do. Other errors, and MLflow's refusals, are raised at once."""
    import requests

    deadline = time.time() + wait_limit()
    while True:
        try:
            return fn(*args)
        except (mlflow.exceptions.MlflowException, requests.exceptions.ConnectionError) as e:
            if refused_for_good(e) or time.time() > deadline:
                raise
            print(f"farm: MLflow unreachable while writing {what} ({str(e).splitlines()[0][:120]}); retrying",
                  flush=True)
            time.sleep(10)


def refused_for_good(e: BaseException) -> bool:
    """MLflow said no to the request itself (a 4xx other than timeout / too many requests): retrying the
    same record can never succeed. Unreachable servers and 5xx are worth retrying."""
    status = getattr(e, "get_http_status_code", None)
    code = status() if callable(status) else None
    return isinstance(code, int) and 400 <= code < 500 and code not in (408, 429)


def deliver_outbox(c: MlflowClient, outbox: Path) -> int:
    """Deliver queued records in order; stop at the first that cannot be delivered yet. A record MLflow
    refuses for good is parked in outbox/<run>/parked/ with the reason (`farm sync` lists them) and the rest
    go on. Returns how many are left to deliver."""
    queued = sorted(outbox.glob("*.json")) if outbox.is_dir() else []
    for i, f in enumerate(queued):
        record = json.loads(f.read_text())
        try:
            _deliver(c, record, f)
        except Exception as e:  # noqa: BLE001 (unreachable or refused: keep it)
            record["last_error"] = str(e).splitlines()[0][:500] if str(e) else type(e).__name__
            if refused_for_good(e):
                storage.atomic_write_text(outbox / "parked" / f.name, json.dumps(record, default=str))
                f.unlink()
                print(f"farm: MLflow refused {record.get('run_name') or record['op']} for good "
                      f"({record['last_error'][:200]}); parked in {outbox / 'parked' / f.name}", flush=True)
                continue
            storage.atomic_write_text(f, json.dumps(record, default=str))
            return len(queued) - i
        f.unlink()
    if outbox.is_dir() and not any(outbox.iterdir()):
        outbox.rmdir()
    return 0


def parked(home: Path | None = None) -> list[tuple[Path, str]]:
    """Records MLflow refused for good, with why."""
    files = sorted((home or storage.home()).joinpath("outbox").glob("*/parked/*.json"))
    return [(f, json.loads(f.read_text()).get("last_error", "")) for f in files]


def _cell_run_id(c: MlflowClient, record: dict, what: str) -> str:
    found = c.search_runs([record["experiment_id"]], f"tags.`mlflow.parentRunId` = '{record['parent_id']}' and "
                          f"tags.`farm.cell_id` = '{record['cell_id']}'", max_results=1)
    if not found:
        raise FarmError(f"{what} of {record['label']}: its cell run is not in MLflow yet")
    return found[0].info.run_id


def _deliver_serve(c: MlflowClient, record: dict) -> None:
    from farm.serve import bench as servebench

    if record["op"] == "serve_summary":
        with tempfile.TemporaryDirectory() as d:
            text = "\n\n".join(f"{label}\n{servebench.table(r)}" for label, r in record["curves"].items())
            _write(Path(d), "serve.txt", text)
            servebench.plot(record["curves"], Path(d) / "serve.png")
            c.log_artifacts(record["run_id"], d)
        return
    rid = _cell_run_id(c, record, "serve results")
    if record["error"]:
        c.set_tag(rid, "farm.serve.error", record["error"])
        with tempfile.TemporaryDirectory() as d:
            _write(Path(d), "serve_error.txt", record.get("report") or record["error"])
            c.log_artifacts(rid, d)
        return
    result = record["result"]
    now = int(time.time() * 1000)
    tags = {"farm.serve.engine": result["engine"], "farm.serve.threads": str(result["threads"]),
            "farm.serve.parallel": str(result["parallel"]), "farm.serve.stage": record.get("stage", ""),
            **{f"farm.serve.{k}": str(v) for k, v in result.get("settings", {}).items()}}
    named = set(record.get("scalars") or ())
    c.log_batch(rid, metrics=[Metric(k, v, now, step) for k, v, step in servebench.mlflow_metrics(result, named)],
                tags=[RunTag(k, v) for k, v in tags.items()])
    with tempfile.TemporaryDirectory() as d:
        _write(Path(d), "serve.json", result)
        _write(Path(d), "serve.txt", servebench.table(result))
        servebench.plot({record["label"]: result}, Path(d) / "serve.png")
        c.log_artifacts(rid, d)


def _deliver_tasks(c: MlflowClient, record: dict) -> None:
    rid = _cell_run_id(c, record, "task accuracy")
    with tempfile.TemporaryDirectory() as d:
        if record["error"]:
            c.set_tag(rid, "farm.tasks.error", record["error"])
            _write(Path(d), "tasks_error.txt", record.get("report") or record["error"])
        else:
            result, now = record["result"], int(time.time() * 1000)
            c.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in result["metrics"].items()],
                        tags=[RunTag("farm.tasks.stage", result["stage"]),
                              RunTag("farm.cached.tasks", str(result["cached"]).lower())])
            _write(Path(d), "tasks.json", {"cost": result["cost"], "items": result["items"]})
        c.log_artifacts(rid, d)


def _deliver(c: MlflowClient, record: dict, path: Path) -> None:
    """Write one record to MLflow. Every step may be repeated without harm."""
    if record["op"] in ("serve", "serve_summary"):
        _deliver_serve(c, record)
        return
    if record["op"] == "tasks":
        _deliver_tasks(c, record)
        return
    if record["op"] == "cell" and not record["run_id"]:
        found = []
        if record["attempts"]:  # an earlier try may have created the run before its reply was lost
            found = c.search_runs([record["experiment_id"]],
                                  f"tags.`mlflow.parentRunId` = '{record['parent_id']}' and "
                                  f"tags.`farm.cell_id` = '{record['cell_id']}'", max_results=1)
        record["attempts"] += 1
        storage.atomic_write_text(path, json.dumps(record, default=str))
        run = found[0] if found else c.create_run(record["experiment_id"], run_name=record["run_name"],
                                                  tags={k: record["tags"][k] for k in
                                                        ("mlflow.parentRunId", "farm.kind", "farm.cell_id")})
        record["run_id"] = run.info.run_id
        storage.atomic_write_text(path, json.dumps(record, default=str))
    rid = record["run_id"]
    now = int(time.time() * 1000)
    c.log_batch(rid, metrics=[Metric(k, v, now, 0) for k, v in (record.get("metrics") or {}).items()],
                params=[Param(k, v) for k, v in (record.get("params") or {}).items()],
                tags=[RunTag(k, v) for k, v in (record.get("tags") or {}).items()])
    # curves with the record's own timestamp: a repeated delivery writes the same points, not new ones
    points = [Metric(k, v, record.get("logged_at", now), st) for k, pts in (record.get("history") or {}).items()
              for st, v in pts]
    for i in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics per batch
        c.log_batch(rid, metrics=points[i:i + 1000])
    if record.get("files"):
        with tempfile.TemporaryDirectory() as d:
            for name, obj in record["files"].items():
                _write(Path(d), name, obj)
            c.log_artifacts(rid, d)
    for folder, path in (record.get("artifacts") or {}).items():  # files from storage, logged as they are
        if Path(path).is_file():
            c.log_artifact(rid, path, artifact_path=folder)
        else:
            print(f"farm: WARNING: {record['run_name']}: {path} is gone from storage; not logged to its run",
                  flush=True)
    if record.get("status"):
        c.set_terminated(rid, record["status"])


def sync(home: Path | None = None) -> int:
    """Deliver what earlier submissions left in their outboxes (MLflow was down when they ended)."""
    c = client()
    left = 0
    for outbox in sorted((home or storage.home()).joinpath("outbox").glob("*")):
        left += deliver_outbox(c, outbox)
    return left


def _bench_json(bench: dict | None) -> Path | None:
    """The raw benchmark file; with a remote store it may live on another node's cache: fetch it."""
    if not bench or not bench.get("bench_json"):
        return None
    path = Path(bench["bench_json"])
    if not path.is_file() and storage.url():
        path = storage.fetch(bench["stage"], (bench.get("pins") or {}).get(bench["stage"])) / "bench.json"
    return path if path.is_file() else None


def cell_label(cell) -> str:
    p = cell.params()
    steps = "+".join(step_label(s) for s in cell.spec["compress"]) or "base"
    export = f"{p['export.format']}-{p['export.quant']}"
    if p.get("export.algorithm", "rtn") != "rtn":
        export += f"-{p['export.algorithm']}"
    if "export.group_size" in p:
        export += f"-g{p['export.group_size']}"
    if p.get("export.ratio", "1.0") != "1.0":
        export += f"-r{p['export.ratio']}"
    if p.get("export.builder"):
        export += f"-{p['export.builder']}"
    runtime = cell.spec["export"].get("runtime")
    if runtime:  # the runtime, when not the format's own, and its options that differ from their defaults
        from farm.export import FORMATS
        from farm.runtimes import RUNTIMES

        if runtime["name"] != FORMATS.options(cell.spec["export"]["format"]).RUNTIME:
            export += f"-{runtime['name']}"
        tags = RUNTIMES.options(runtime["name"]).label_of(runtime)
        export += f"-{tags}" if tags else ""
    return f"{steps}/{export}@{p['target.name']}"


# ---- reading a sweep back: pareto and promote
def latest_sweep_run(name: str, run_id: str | None = None):
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is None:
        raise FarmError(f"no MLflow experiment named '{name}' at {mlflow.get_tracking_uri()} — submit the sweep first")
    if run_id:
        return c, exp, c.get_run(run_id)
    runs = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'sweep'", order_by=["attributes.start_time DESC"],
                         max_results=1)
    if not runs:
        raise FarmError(f"experiment '{name}' has no sweep run yet")
    return c, exp, runs[0]


def sweep_runs(name: str | None) -> list[tuple]:
    """(experiment, latest sweep run) of one sweep, or of every sweep on the server."""
    if name:
        _, exp, run = latest_sweep_run(name)
        return [(exp, run)]
    c = client()
    out = []
    for exp in c.search_experiments():
        runs = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'sweep'",
                             order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            out.append((exp, runs[0]))
    return out


def cell_runs(parent) -> list:
    """Every cell run of a submission, finished or failed."""
    return client().search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                max_results=5000, order_by=["attributes.start_time ASC"])


def cell_rows(c: MlflowClient, exp, parent) -> list[dict]:
    runs = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                         max_results=5000)
    rows = []
    for r in runs:
        if r.info.status != "FINISHED":
            continue
        p, t = r.data.params, r.data.tags
        rows.append({"id": r.info.run_id, "target": p.get("target.name", ""),
                     "baseline": t.get("farm.baseline") == "true", "metrics": dict(r.data.metrics),
                     "failed_later": "farm.tasks.error" in t,
                     "contaminated": t.get("farm.bench.contaminated") == "true",
                     "format": p.get("export.format", ""), "quant": p.get("export.quant", ""),
                     "runtime": p.get("export.runtime.name", ""), "pipeline": p.get("compress.method", "none"),
                     "algorithm": p.get("export.algorithm"), "group_size": p.get("export.group_size"),
                     "measured_at": t.get("farm.bench.measured_at", ""), "hostname": t.get("farm.hostname", ""),
                     "label": t.get("farm.label", r.info.run_name)})
    return rows


def sweep_spec(c: MlflowClient, parent) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = c.download_artifacts(parent.info.run_id, "sweep.json", d)
        return json.loads(Path(path).read_text())


def record_pareto(c: MlflowClient, parent, rows: list[dict], status: dict, table_text: str, plot: Path | None,
                  speedups: dict | None = None, description: str = ""):
    """The front's verdict on every cell (tags), their speed-ups against both baselines (metrics), the table and
    plot on the parent run, and the sweep's description on the experiment and the parent run (MLflow shows
    mlflow.note.content as the description)."""
    now = int(time.time() * 1000)
    for r in rows:
        s = status[r["id"]]
        tags = [RunTag("farm.pareto", str(s["pareto"]).lower()), RunTag("farm.feasible", str(s["feasible"]).lower())]
        if s["reason"]:
            tags.append(RunTag("farm.infeasible_reason", s["reason"][:4000]))
        sp = (speedups or {}).get(r["id"], {})
        if sp.get("best_fp32"):
            tags.append(RunTag("farm.best_fp32_cell", sp["best_fp32"]))
        metrics = [Metric(k, float(v), now, 0) for k, v in sp.items() if k.startswith("speedup") and v is not None]
        c.log_batch(r["id"], metrics=metrics, tags=tags)
    if description:
        c.set_experiment_tag(parent.info.experiment_id, "mlflow.note.content", description)
        c.set_tag(parent.info.run_id, "mlflow.note.content", description)
    with tempfile.TemporaryDirectory() as d:
        _write(Path(d), "pareto.txt", table_text)
        _write(Path(d), "pareto.json", [{**r, **status[r["id"]]} for r in rows])
        c.log_artifacts(parent.info.run_id, d)
    if plot is not None:
        c.log_artifact(parent.info.run_id, str(plot))
    c.set_tag(parent.info.run_id, "farm.pareto_cells", str(sum(s["pareto"] for s in status.values())))
