"""The Pareto report of a sweep, read back from MLflow: table, plot, tags. Used by the driver at the
end of a job and by `farm pareto NAME`."""

from __future__ import annotations

import tempfile
from pathlib import Path

from farm import pareto, tracking
from farm.spec import BETTER

COLUMNS = ["perplexity", "kl_div", "top1_agree", "prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mb",
           "size_mb"]


def pareto_report(name: str, run_id: str | None = None) -> dict:
    c, exp, parent = tracking.latest_sweep_run(name, run_id)
    spec = tracking.sweep_spec(c, parent)
    rows = tracking.cell_rows(c, exp, parent)
    status = pareto.front(rows, spec["objectives"], spec["constraints"])
    text = pareto.table(rows, status, COLUMNS)
    objectives = list(spec["objectives"])
    with tempfile.TemporaryDirectory() as d:
        plot = None
        if len(objectives) >= 2 and rows:
            plot = Path(d) / "pareto.png"
            pareto.plot(rows, status, objectives[1], objectives[0], plot)
        tracking.record_pareto(c, parent, rows, status, text, plot)
    promote = spec["promote"]
    direction = spec["objectives"].get(promote["metric"], BETTER[promote["metric"]])
    best = pareto.pick(rows, status, promote["metric"], direction)
    return {"parent": parent.info.run_id, "experiment": exp.experiment_id, "rows": rows, "status": status,
            "table": text, "best": best, "spec": spec}
