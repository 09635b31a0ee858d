"""Everything farm writes to MLflow goes through here: a durable outbox on local disk, delivered in order.

farm/record/ is the only package that imports mlflow (with farm/decide/promote.py and deploy.py, which log models
and load tests). One experiment per sweep (named after the sweep), one parent run per submission, one child run
per cell (farm/record/cells.py builds its record); a later phase's measurement updates the cell's run.
"""

from __future__ import annotations

import base64
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

from farm import storage
from farm.errors import FarmError
from farm.record.cells import cell_label, cell_record

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
    if isinstance(obj, dict) and set(obj) == {"base64"}:  # bytes (a plot), carried in the JSON record
        p.write_bytes(base64.b64decode(obj["base64"]))
    else:
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
        self.later_failed: dict[str, int] = {}  # later-phase kind -> its failed measurements (tasks, serve)
        self._queue({"op": "run", "run_id": self.run_id, "status": None,
                     "params": {"sweep.name": sweep.name, "sweep.cells": str(len(grid.cells)),
                                "sweep.stages": str(len(grid.stages))},
                     "files": {"sweep.yaml": source_text, "sweep.json": sweep.model_dump(mode="json"),
                               "grid.json": {"stages": [st.__dict__ for st in grid.stages.values()],
                                             "cells": [c.__dict__ for c in grid.cells]}}})

    def log_cell(self, cell, export: dict | None, results: dict[str, dict | None],
                 error: BaseException | None = None, error_text: str | None = None,
                 steps: list[dict | None] = ()) -> int:
        """Queue the cell's run and try to deliver; returns how many records still wait for MLflow.
        results: each single-stream measurement's result by kind; steps: the results of the cell's compression
        steps, in order (what each did; training curves)."""
        return self._queue(cell_record(self.experiment_id, self.run_id, cell, export, results, error, error_text,
                                       steps))

    def log_update(self, cell, kind: str, update: dict | None, error: BaseException | None) -> int:
        """What a later phase's measurement adds to the cell's run: {"metrics": [[name, value, step]], "tags",
        "files"} (a file's value: text, JSON, or {"base64": ...} for bytes); a failure as farm.<kind>.error with
        the report as <kind>_error.txt."""
        record = {"op": "update", "experiment_id": self.experiment_id, "parent_id": self.run_id,
                  "cell_id": cell.id, "label": cell_label(cell), "kind": kind}
        if error is not None:
            self.later_failed[kind] = self.later_failed.get(kind, 0) + 1
            text = (str(error) or type(error).__name__)[:4000]
            report = getattr(error, "report", "") or "".join(traceback.format_exception(error))
            record.update(tags={f"farm.{kind}.error": text}, files={f"{kind}_error.txt": report or text})
        else:
            record.update(metrics=update.get("metrics", []), tags=update.get("tags", {}), files=update.get("files", {}))
        return self._queue(record)

    def log_parent_files(self, files: dict) -> int:
        """Files on the sweep's parent run (a phase's summary over every cell)."""
        return self._queue({"op": "run", "run_id": self.run_id, "files": files}) if files else 0

    def progress(self, line: str) -> None:
        """The sweep's progress as a tag of its parent run (`farm status` shows it). Best effort: not queued,
        the next line replaces it anyway."""
        try:
            self.c.set_tag(self.run_id, "farm.progress", line[:4000])
        except Exception:  # noqa: BLE001, S110 (MLflow unreachable: the outbox holds what matters)
            pass

    def abort(self, reason: str) -> None:
        """The submission was stopped (a signal, Ctrl-C, an error such as a full disk): its finished cells stay,
        the parent run says KILLED and why. Resubmitting the sweep reuses every finished stage and logs a complete
        new parent run. When not even the outbox can be written (the disk is full), MLflow is told directly."""
        record = {"op": "run", "run_id": self.run_id, "tags": {"farm.stopped": reason[:4000]}, "status": "KILLED"}
        try:
            self._queue(record)
        except OSError:
            try:
                _deliver(self.c, record, None)
            except Exception as e:  # noqa: BLE001 (stopping anyway: say where it stands)
                print(f"farm: could not mark MLflow run {self.run_id} KILLED ({e}); it stays RUNNING", flush=True)

    def outcome(self, failed: int) -> str:
        """farm.outcome: 'complete', 'failed' (no cell finished) or what is partial — failed cells, and failed
        measurements of the later phases (tasks, serve) of cells that finished."""
        total = self.n_cells
        if failed >= total:
            return "failed"
        parts = [f"{failed} of {total} cells failed"] if failed else []
        parts += [f"{n} {kind} measurement(s) failed" for kind, n in sorted(self.later_failed.items())]
        return f"partial: {', '.join(parts)} (`farm status` lists why)" if parts else "complete"

    def finish(self, failed: int) -> None:
        """The parent run FINISHED when any cell finished (a partial sweep still has a front to show: farm.outcome
        says what failed), FAILED only when every cell failed."""
        total = self.n_cells
        self._queue({"op": "run", "run_id": self.run_id,
                     "metrics": {"cells_failed": failed, "later_failed": sum(self.later_failed.values())},
                     "tags": {"farm.outcome": self.outcome(failed)}, "status": "FAILED" if failed >= total else "FINISHED"})
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
                _close_refused(c, record)
                print(f"farm: MLflow refused {record.get('run_name') or record['op']} for good "
                      f"({record['last_error'][:200]}); parked in {outbox / 'parked' / f.name}", flush=True)
                continue
            storage.atomic_write_text(f, json.dumps(record, default=str))
            return len(queued) - i
        f.unlink()
    if outbox.is_dir() and not any(outbox.iterdir()):
        outbox.rmdir()
    return 0


def _close_refused(c: MlflowClient, record: dict) -> None:
    """A refused record's run, if it was created, ends FAILED with why (farm.refused), not RUNNING for ever."""
    if record["op"] == "update" or not record.get("run_id"):
        return
    try:
        c.set_tag(record["run_id"], "farm.refused", record["last_error"][:4000])
        c.set_terminated(record["run_id"], "FAILED")
    except Exception:  # noqa: BLE001, S110 (parked with its reason; farm sync lists it)
        pass


def parked(home: Path | None = None) -> list[tuple[Path, str]]:
    """Records MLflow refused for good, with why."""
    files = sorted((home or storage.home()).joinpath("outbox").glob("*/parked/*.json"))
    return [(f, json.loads(f.read_text()).get("last_error", "")) for f in files]


def _cell_run(c: MlflowClient, record: dict, what: str):
    found = c.search_runs([record["experiment_id"]], f"tags.`mlflow.parentRunId` = '{record['parent_id']}' and "
                          f"tags.`farm.cell_id` = '{record['cell_id']}'", max_results=1)
    if not found:
        raise FarmError(f"{what} of {record['label']}: its cell run is not in MLflow yet")
    return found[0]


def _files(c: MlflowClient, run_id: str, files: dict, artifact_uri: str | None) -> None:
    """Write files into a run's artifacts, at the URI its creation or a search returned where known:
    MlflowClient.log_artifacts would first fetch the run again only to learn it (one more request per run)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    with tempfile.TemporaryDirectory() as d:
        for name, obj in files.items():
            _write(Path(d), name, obj)
        if artifact_uri:
            get_artifact_repository(artifact_uri).log_artifacts(d)
        else:
            c.log_artifacts(run_id, d)


def _deliver_update(c: MlflowClient, record: dict) -> None:
    run = _cell_run(c, record, f"the {record['kind']} results")
    rid = run.info.run_id
    now = int(time.time() * 1000)
    c.log_batch(rid, metrics=[Metric(k, float(v), now, int(step)) for k, v, step in record.get("metrics") or []],
                tags=[RunTag(k, str(v)) for k, v in (record.get("tags") or {}).items()])
    if record.get("files"):
        _files(c, rid, record["files"], run.info.artifact_uri)


def _deliver(c: MlflowClient, record: dict, path: Path | None) -> None:
    """Write one record to MLflow. Every step may be repeated without harm."""
    if record["op"] == "update":
        _deliver_update(c, record)
        return
    if record["op"] == "cell" and not record["run_id"]:
        found = []
        if record["attempts"]:  # an earlier try may have created the run before its reply was lost
            found = c.search_runs([record["experiment_id"]],
                                  f"tags.`mlflow.parentRunId` = '{record['parent_id']}' and "
                                  f"tags.`farm.cell_id` = '{record['cell_id']}'", max_results=1)
        record["attempts"] += 1
        if path is not None:
            storage.atomic_write_text(path, json.dumps(record, default=str))
        run = found[0] if found else c.create_run(record["experiment_id"], run_name=record["run_name"],
                                                  tags={k: record["tags"][k] for k in
                                                        ("mlflow.parentRunId", "farm.kind", "farm.cell_id")})
        record["run_id"], record["artifact_uri"] = run.info.run_id, run.info.artifact_uri
        if path is not None:
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
        _files(c, rid, record["files"], record.get("artifact_uri"))
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
