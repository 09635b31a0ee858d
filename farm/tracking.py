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
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _write(dirpath: Path, name: str, obj) -> Path:
    p = dirpath / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1, default=str))
    return p


class SweepLog:
    """The parent run of one submission, and its child runs."""

    def __init__(self, sweep, grid, source_text: str):
        self.c = client()
        exp = self.c.get_experiment_by_name(sweep.name)
        self.experiment_id = exp.experiment_id if exp else self.c.create_experiment(sweep.name)
        run = self.c.create_run(self.experiment_id, run_name=f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                tags={"farm.kind": "sweep", "farm.sweep": sweep.name})
        self.run_id = run.info.run_id
        self.c.log_batch(self.run_id, params=[Param("sweep.name", sweep.name),
                                              Param("sweep.cells", str(len(grid.cells))),
                                              Param("sweep.stages", str(len(grid.stages)))])
        with tempfile.TemporaryDirectory() as d:
            _write(Path(d), "sweep.yaml", source_text)
            _write(Path(d), "sweep.json", sweep.model_dump(mode="json"))
            _write(Path(d), "grid.json", {"stages": [s.__dict__ for s in grid.stages.values()],
                                          "cells": [c.__dict__ for c in grid.cells]})
            self.c.log_artifacts(self.run_id, d)

    def log_cell(self, cell, export: dict | None, evaluate: dict | None, bench: dict | None,
                 error: BaseException | None = None, error_text: str | None = None) -> str:
        label = cell_label(cell)
        tags = {"mlflow.parentRunId": self.run_id, "farm.kind": "cell", "farm.cell_id": cell.id,
                "farm.baseline": str(cell.baseline).lower(), "farm.label": label}
        run = self.c.create_run(self.experiment_id, run_name=label, tags=tags)
        rid = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in cell.params().items()]
        metrics, more_tags = [], {}
        now = int(time.time() * 1000)
        for result in (evaluate, bench):
            for k, v in ((result or {}).get("metrics") or {}).items():
                metrics.append(Metric(k, float(v), now, 0))
        if export:
            more_tags.update({"farm.artifact_uri": storage.uri_of(export["artifact"]),
                              "farm.artifact_format": export["format"],
                              "farm.artifact_sha256": export.get("sha256", "")})
        for kind, result in (("export", export), ("evaluate", evaluate), ("bench", bench)):
            if result:  # reused from an earlier submission (same content id) rather than run again
                more_tags[f"farm.cached.{kind}"] = str(result.get("cached", False)).lower()
        if bench:
            host = bench.get("host", {})
            # the labels of the Ray node it ran on (those the label selector matched); else this machine's
            labels = bench.get("node_labels") or (nodes.labels(host) if host else {})
            more_tags.update({f"farm.node.{k}": v for k, v in labels.items()})
            more_tags.update({"farm.cpu_model": host.get("model_name", ""), "farm.isa": host.get("isa", ""),
                              "farm.hostname": host.get("hostname", ""), "farm.node_id": bench.get("node_id", ""),
                              "farm.bench.contaminated": str(bench.get("contaminated")).lower(),
                              "farm.bench.threads": str(bench.get("threads"))})
            more_tags.update({f"farm.version.{k}": v for k, v in bench.get("versions", {}).items()})
            more_tags.update({f"farm.runtime.{k}": v for k, v in bench.get("runtime_settings", {}).items()})
        self.c.log_batch(rid, metrics=metrics, params=params,
                         tags=[RunTag(k, str(v)) for k, v in more_tags.items()])
        with tempfile.TemporaryDirectory() as d:
            _write(Path(d), "cell_spec.json", {"id": cell.id, "baseline": cell.baseline, **cell.spec})
            raw = _bench_json(bench)
            if raw is not None:
                _write(Path(d), "bench.json", raw.read_text())
            stages = {k: v for k, v in (("export", export), ("evaluate", evaluate), ("bench", bench)) if v}
            _write(Path(d), "stages.json", stages)
            if error is not None or error_text:
                text = error_text or "".join(traceback.format_exception(error))
                _write(Path(d), "error.txt", text)
                self.c.set_tag(rid, "farm.error", (str(error) if error else text.splitlines()[-1])[:4000])
            self.c.log_artifacts(rid, d)
        self.c.set_terminated(rid, "FAILED" if (error is not None or error_text) else "FINISHED")
        return rid

    def abort(self, reason: str) -> None:
        """The submission was stopped: its finished cells stay, the parent run says KILLED and why.
        Resubmitting the sweep reuses every finished stage and logs a complete new parent run."""
        self.c.set_tag(self.run_id, "farm.stopped", reason)
        self.c.set_terminated(self.run_id, "KILLED")

    def finish(self, failed: int) -> None:
        self.c.log_metric(self.run_id, "cells_failed", failed)
        self.c.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _bench_json(bench: dict | None) -> Path | None:
    """The raw benchmark file; with a remote store it may live on another node's cache: fetch it."""
    if not bench or not bench.get("bench_json"):
        return None
    path = Path(bench["bench_json"])
    if not path.is_file() and storage.url():
        path = storage.fetch(bench["stage"]) / "bench.json"
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


def cell_rows(c: MlflowClient, exp, parent) -> list[dict]:
    runs = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                         max_results=5000)
    rows = []
    for r in runs:
        if r.info.status != "FINISHED":
            continue
        rows.append({"id": r.info.run_id, "target": r.data.params.get("target.name", ""),
                     "baseline": r.data.tags.get("farm.baseline") == "true", "metrics": dict(r.data.metrics),
                     "label": r.data.tags.get("farm.label", r.info.run_name)})
    return rows


def sweep_spec(c: MlflowClient, parent) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = c.download_artifacts(parent.info.run_id, "sweep.json", d)
        return json.loads(Path(path).read_text())


def record_pareto(c: MlflowClient, parent, rows: list[dict], status: dict, table_text: str, plot: Path | None):
    for r in rows:
        s = status[r["id"]]
        c.set_tag(r["id"], "farm.pareto", str(s["pareto"]).lower())
        c.set_tag(r["id"], "farm.feasible", str(s["feasible"]).lower())
        if s["reason"]:
            c.set_tag(r["id"], "farm.infeasible_reason", s["reason"])
    with tempfile.TemporaryDirectory() as d:
        _write(Path(d), "pareto.txt", table_text)
        _write(Path(d), "pareto.json", [{**r, **status[r["id"]]} for r in rows])
        c.log_artifacts(parent.info.run_id, d)
    if plot is not None:
        c.log_artifact(parent.info.run_id, str(plot))
    c.set_tag(parent.info.run_id, "farm.pareto_cells", str(sum(s["pareto"] for s in status.values())))
