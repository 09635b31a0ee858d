"""Reading a sweep back from MLflow (the front, the report, promote, `farm status`), and the front's verdict
written onto its runs."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from farm.errors import FarmError
from farm.record.cells import row
from farm.record.outbox import _write, client

PAGE = 1000  # runs per search request: every cell is read, whatever the sweep's size


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


def all_runs(c: MlflowClient, experiment_id: str, where: str, order_by: list[str] | None = None) -> list:
    """Every run that matches, page by page (a sweep may have more cells than one search returns)."""
    out, token = [], None
    while True:
        page = c.search_runs([experiment_id], where, max_results=PAGE, order_by=order_by, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def cell_runs(parent) -> list:
    """Every cell run of a submission, finished or failed."""
    return all_runs(client(), parent.info.experiment_id, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                    ["attributes.start_time ASC"])


def cell_rows(c: MlflowClient, exp, parent) -> list[dict]:
    """The front's rows (farm.record.cells.row) of a submission's finished cells, as MLflow holds them."""
    rows = []
    for r in all_runs(c, exp.experiment_id, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"):
        if r.info.status != "FINISHED":
            continue
        t = r.data.tags
        failed = [k.split(".")[1] for k in t if k.startswith("farm.") and k.endswith(".error") and k.count(".") == 2]
        rows.append(row(r.info.run_id, r.data.params, t.get("farm.baseline") == "true", dict(r.data.metrics),
                        t.get("farm.label", r.info.run_name), t.get("farm.contaminated", t.get(
                            "farm.bench.contaminated")) == "true", failed,
                        t.get("farm.measured_at", t.get("farm.bench.measured_at", "")), t.get("farm.hostname", "")))
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
