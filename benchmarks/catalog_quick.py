"""Quality of a sweep's cells without the cluster: every cell's stages (compress -> export -> evaluate)
run inline in this process, in the sweep's order, on the same reference tokens; no speed benchmark.
Stages already in storage are reused, as in a sweep (same ids), and what runs here is stored for it.

    FARM_HOME=.farm .venv/bin/python benchmarks/catalog_quick.py jobs/quant.yaml [--threads 2] [--match REGEX]

Prints a markdown row per cell: perplexity, KL(base || cell), top-1 agreement, size on disk, and the
seconds the cell's compression steps took (when they ran: a reused stage reports its first run). With
--tasks, the cells' task-accuracy stages run too (the sweep's `tasks` section, through each cell's runtime)
and each row gets every task's accuracy ± its standard error, and a compressed cell its paired difference from
the uncompressed base exported the same way (farm.measure.tasks.paired; the base's cell must be in the run too).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--match", default="", help="only the cells whose label matches this regular expression")
    ap.add_argument("--info", default="", help="comma-separated keys of the last compression step's info to "
                    "print after each row (e.g. train_seconds,loss_last)")
    ap.add_argument("--tasks", action="store_true", help="also score the sweep's tasks on every cell")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # what stages.threads_here() gives every stage
    os.environ.setdefault("FARM_HOME", str(ROOT / ".farm"))
    sys.path.insert(0, str(ROOT))

    from farm.measure.tasks import paired
    from farm.plan import grid
    from farm.stages.runner import run_stage
    from farm.sweep import spec

    g = grid.build(spec.load(args.sweep))
    results: dict[str, dict] = {}
    base_items: dict[str, dict] = {}  # export -> the uncompressed base's per-item picks, for paired differences
    header_tasks: list[str] = []
    rows = []
    for cell in g.cells:
        steps = cell.spec["compress"]
        label = " + ".join(spec.step_label(s) for s in steps) or "none"
        exp = cell.spec["export"]
        target = f"{exp['format']} {exp['quant']}" + (f" {exp['algorithm']}" if exp.get("algorithm") else "")
        if args.match and not re.search(args.match, f"{label} {target}"):
            continue
        t0 = time.time()
        wanted = [cell.stages.get("evaluate")] + ([cell.stages.get("tasks")] if args.tasks and cell.stages.get("tasks") else [])
        for stage in g.closure(wanted):
            if stage.id not in results:
                results[stage.id] = run_stage(stage, [results[d] for d in stage.deps])
        metrics = results[cell.stages.get("evaluate")]["metrics"]
        compress_s = sum(results[s.id]["seconds"] for s in g.closure([cell.stages.get("evaluate")]) if s.kind == "compress")
        row = (f"| {label} | {target} | {metrics['perplexity']:.3f} | {metrics['kl_div']:.4f} | "
               f"{metrics['top1_agree']:.3f} | {results[cell.export].get('size_mb', 0):.1f} | {compress_s:.0f} |")
        if args.tasks and cell.stages.get("tasks"):
            got = results[cell.stages.get("tasks")]["metrics"]
            names = sorted(k.split(".", 1)[1] for k in got if k.startswith("acc.") and not k.startswith("acc.mean"))
            row += " " + " | ".join(f"{got[f'acc.{t}']:.3f} ± {got[f'acc_stderr.{t}']:.3f}" for t in names) + " |"
            if not steps:
                base_items[target] = results[cell.stages.get("tasks")]["items"]
            twin = base_items.get(target) if steps else None
            diffs = [paired(results[cell.stages.get("tasks")]["items"][t], twin[t]) if twin and t in twin else None for t in names]
            row += " " + " | ".join(f"{d[0]:+.3f} ± {d[1]:.3f}" if d else "" for d in diffs) + " |"
            header_tasks[:] = names
        if args.info:
            steps_run = [s for s in g.closure([cell.stages.get("evaluate")]) if s.kind == "compress"]
            info = results[steps_run[-1].id].get("info", {}) if steps_run else {}
            row += " " + ", ".join(f"{k}={info.get(k)}" for k in args.info.split(","))
        rows.append(row)
        print(row, f"  ({time.time() - t0:.0f} s here)", file=sys.stderr, flush=True)
    print("| pipeline | export | perplexity | KL | top-1 | size MB | compress s |"
          + "".join(f" acc {t} |" for t in header_tasks) + "".join(f" vs base {t} |" for t in header_tasks))
    print("|---|---|---|---|---|---|---|" + "---|" * 2 * len(header_tasks))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
