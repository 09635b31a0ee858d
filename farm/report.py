"""The Pareto report of a sweep, read back from MLflow: table, plot, tags. Used by the driver at the
end of a job and by `farm pareto NAME`."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from farm import pareto, tracking
from farm.spec import better, front_constraints, is_task_metric

COLUMNS = ["perplexity", "kl_div", "top1_agree", "prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb",
           "size_mb"]


def pareto_report(name: str, run_id: str | None = None) -> dict:
    c, exp, parent = tracking.latest_sweep_run(name, run_id)
    spec = tracking.sweep_spec(c, parent)
    rows = tracking.cell_rows(c, exp, parent)
    status = pareto.front(rows, spec["objectives"], front_constraints(spec), later=is_task_metric)
    tasks = list((spec.get("tasks") or {}).get("items") or {})
    longs = ["perplexity_near", "perplexity_far"] if (spec.get("data") or {}).get("long_window_tokens") else []
    text = pareto.table(rows, status, COLUMNS[:3] + longs + COLUMNS[3:]
                        + ([f"acc.{t}" for t in tasks] + ["task_acc_mean"] if tasks else []))
    objectives = list(spec["objectives"])
    with tempfile.TemporaryDirectory() as d:
        plot = None
        if len(objectives) >= 2 and rows:
            plot = Path(d) / "pareto.png"
            pareto.plot(rows, status, objectives[1], objectives[0], plot)
        tracking.record_pareto(c, parent, rows, status, text, plot)
    promote = spec["promote"]
    direction = spec["objectives"].get(promote["metric"], better(promote["metric"]))
    best = pareto.pick(rows, status, promote["metric"], direction)
    return {"parent": parent.info.run_id, "experiment": exp.experiment_id, "rows": rows, "status": status,
            "table": text, "best": best, "spec": spec}


def status_report(name: str | None = None) -> str:
    """`farm status [NAME]`: the latest submission of a sweep (or of every sweep): its state, its progress
    line while it runs, and each logged cell with its key numbers or why it failed."""
    lines = []
    for exp, parent in tracking.sweep_runs(name):
        tags, params = parent.data.tags, parent.data.params
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(parent.info.start_time / 1000))
        cells = tracking.cell_runs(parent)
        n_failed = sum(r.info.status == "FAILED" for r in cells)
        lines.append(f"{exp.name}: {parent.info.status} (run {parent.info.run_id}, started {started}); "
                     f"{len(cells)}/{params.get('sweep.cells', '?')} cells logged, {n_failed} failed")
        if "farm.progress" in tags:
            lines.append(f"  progress: {tags['farm.progress']}")
        if "farm.stopped" in tags:
            lines.append(f"  stopped: {tags['farm.stopped']}")
        if not name:
            continue
        for r in cells:
            label = r.data.tags.get("farm.label", r.info.run_name)
            if r.info.status == "FAILED":
                lines.append(f"  FAILED    {label}: {r.data.tags.get('farm.error', '').splitlines()[0][:300]}")
                continue
            m = r.data.metrics
            flag = " *" if r.data.tags.get("farm.pareto") == "true" else ""
            lines.append(f"  {r.info.status:<9} {label}: ppl {m.get('perplexity', float('nan')):.3f}  "
                         f"decode {m.get('decode_tok_s', float('nan')):.1f} tok/s  "
                         f"{m.get('size_mb', float('nan')):.1f} MB{flag}")
    return "\n".join(lines) or "no sweep has been submitted to this MLflow server yet"
