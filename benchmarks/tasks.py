"""Full-task accuracy of a few artifacts through their runtimes — what the demo's subset (100 items a task)
estimates: every item of the small validation splits, a larger sample of the big ones, the cost per item per
runtime, and how often each artifact picks the first one's answer (the consistency gate's measure).

    .venv/bin/python benchmarks/tasks.py --tokenizer MODEL_DIR [--tasks piqa:all,arc_easy:all,...]
        [--threads 2] [--out benchmarks/results/tasks] RUNTIME=ARTIFACT [RUNTIME=ARTIFACT ...]

RUNTIME is a farm runtime name (torch, llamacpp, onnxruntime, openvino); ARTIFACT the file or directory a
cell's `farm.artifact_uri` tag names. Each artifact is scored in its own child process, one after another
(nothing else should run: the seconds per item are a cost figure). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.measure.tasks import agreement, score_isolated

DEFAULT = "piqa:all,arc_easy:all,arc_challenge:all,winogrande:all,openbookqa:all,hellaswag:1000"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, type=Path, help="the base model's directory (its tokenizer)")
    ap.add_argument("--tasks", default=DEFAULT, help=f"task:items,... (items: a number or all); default {DEFAULT}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tasks"))
    ap.add_argument("cells", nargs="+", help="RUNTIME=ARTIFACT")
    a = ap.parse_args()
    items = {t: (n if n == "all" else int(n)) for t, n in (x.split(":") for x in a.tasks.split(","))}
    results = []
    for cell in a.cells:
        runtime, _, artifact = cell.partition("=")
        t0 = time.time()
        with tempfile.TemporaryDirectory() as d:
            r = score_isolated({"name": runtime}, Path(artifact), a.tokenizer, items, a.seed, a.threads,
                               Path(d) / "tasks.json", f"{runtime} {Path(artifact).name}")
        results.append({"runtime": runtime, "artifact": artifact, "wall_s": time.time() - t0, **r})
        print(f"{runtime} {Path(artifact).name}: mean acc {r['metrics']['task_acc_mean']:.4f} in "
              f"{time.time() - t0:.0f} s", flush=True)
    tasks = sorted(items)
    lines = [(f"Task accuracy, {', '.join(f'{t} {items[t]}' for t in tasks)} items (seed {a.seed}), {a.threads} "
              f"threads, {cpu_model()}; `python benchmarks/tasks.py --tasks {a.tasks} ...`"), "",
             "| artifact | runtime | " + " | ".join(tasks) + " | mean acc | agrees with first | s/item |",
             "|---|---|" + "---|" * (len(tasks) + 3)]
    for r in results:
        m = r["metrics"]
        cells = []
        for t in tasks:
            text = f"{m[f'acc.{t}']:.3f} ± {m[f'acc_stderr.{t}']:.3f}"
            if f"acc_norm.{t}" in m:
                text += f" (norm {m[f'acc_norm.{t}']:.3f})"
            cells.append(text)
        share, n = agreement(r["items"], results[0]["items"])
        lines.append(f"| {Path(r['artifact']).name} | {r['runtime']} | " + " | ".join(cells)
                     + f" | {m['task_acc_mean']:.4f} | {100 * share:.1f} % of {n} | {m['task_s_per_item']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    summary = [{k: v for k, v in r.items() if k != "items"} for r in results]  # per-item answers: not kept
    a.out.with_suffix(".json").write_text(json.dumps({"cpu": cpu_model(), "items": items, "threads": a.threads,
                                                      "results": summary}, indent=1, default=str))
    a.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
