"""`farm status [NAME]`: what MLflow holds of a sweep's latest submission (or of every sweep's), while it runs and
after: its state, its progress line, and each logged cell with its key numbers or why it failed."""

from __future__ import annotations

import time

from farm.record import queries


def status_report(name: str | None = None) -> str:
    """`farm status [NAME]`: the latest submission of a sweep (or of every sweep): its state, its progress
    line while it runs, and each logged cell with its key numbers or why it failed."""
    lines = []
    for exp, parent in queries.sweep_runs(name):
        tags, params = parent.data.tags, parent.data.params
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(parent.info.start_time / 1000))
        cells = queries.cell_runs(parent)
        n_failed = sum(r.info.status == "FAILED" for r in cells)
        lines.append(f"{exp.name}: {parent.info.status} (run {parent.info.run_id}, started {started}); "
                     f"{len(cells)}/{params.get('sweep.cells', '?')} cells logged, {n_failed} failed")
        if "farm.progress" in tags:
            lines.append(f"  progress: {tags['farm.progress']}")
        if "farm.stopped" in tags:
            lines.append(f"  stopped: {tags['farm.stopped']}")
        if "farm.outcome" in tags:
            lines.append(f"  outcome: {tags['farm.outcome']}")
        if not name:
            continue
        for r in cells:
            label = r.data.tags.get("farm.label", r.info.run_name)
            if r.info.status == "FAILED":
                why = r.data.tags.get("farm.error") or r.data.tags.get("farm.refused", "")
                lines.append(f"  FAILED    {label}: {(why.splitlines() or ['(no message)'])[0][:300]}")
                continue
            m = r.data.metrics
            flag = " *" if r.data.tags.get("farm.pareto") == "true" else ""
            lines.append(f"  {r.info.status:<9} {label}: ppl {m.get('perplexity', float('nan')):.3f}  "
                         f"decode {m.get('decode_tok_s', float('nan')):.1f} tok/s  "
                         f"{m.get('size_mb', float('nan')):.1f} MB{flag}")
            for key, why in sorted(r.data.tags.items()):  # a later phase's measurement that failed (tasks, serve)
                if key.startswith("farm.") and key.endswith(".error") and key != "farm.error":
                    lines.append(f"            {key[5:-6]} FAILED: {(why.splitlines() or ['(no message)'])[0][:300]}")
    return "\n".join(lines) or "no sweep has been submitted to this MLflow server yet"
