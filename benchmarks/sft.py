"""Does instruction tuning help, and is the gain real? The `sft` step inline on a model (default: the embedded
SmolLM2-135M-Instruct), trained on a task's train half; the base and the tuned model then scored through
PyTorch on items of the task's held-out half (with and without the chat template), with the binomial
standard error of each accuracy and of the paired difference. No Ray, no MLflow: the quick check before a
sweep (jobs/workflow.yaml) spends an hour on the whole workflow.

    .venv/bin/python benchmarks/sft.py --task piqa --items 400 --lr 1e-3 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from farm.compress import run_method
from farm.inputs.models import resolve
from farm.measure import tasks
from farm.nodes import facts


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean of b's correctness minus a's over the same items, and its standard error."""
    def ok(r: dict) -> np.ndarray:
        return np.array([int(p == t) for p, t in zip(r["pick"], r["target"])])

    d = ok(b) - ok(a)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", default="piqa")
    ap.add_argument("--items", default="400", help="held-out items scored (or 'all')")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--base-bits", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/sft.md")
    a = ap.parse_args()
    items = a.items if a.items == "all" else int(a.items)
    base = resolve(a.model)
    step = {"method": "sft", "task": a.task, "lr": a.lr, "epochs": a.epochs, "rank": a.rank, "batch": a.batch,
            "examples": a.examples, "base_bits": a.base_bits}
    with tempfile.TemporaryDirectory() as d:
        tuned = Path(d) / "model"
        tuned.mkdir()
        t0 = time.time()
        info = run_method("sft", base, step, np.zeros(1, dtype=np.int64), tuned, a.threads)
        train_s = time.time() - t0
        rows = []
        for chat in (True, False):
            res = {name: tasks.score({"name": "torch"}, m, base, {a.task: items}, 0, a.threads, [a.task], chat)
                   for name, m in (("base", base), ("tuned", tuned))}
            acc = {k: r["metrics"][f"acc.{a.task}"] for k, r in res.items()}
            err = {k: r["metrics"][f"acc_stderr.{a.task}"] for k, r in res.items()}
            diff, diff_se = paired(res["base"]["items"][a.task], res["tuned"]["items"][a.task])
            rows.append((chat, acc, err, diff, diff_se, res["base"]["metrics"][f"items.{a.task}"]))
    curve = info.pop("curve")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None and k != "out")
    lines = [(f"# SFT on {a.task}'s train half, scored on its held-out half ({a.model}, torch fp32, {a.threads} "
              f"threads, {facts()['model_name']})"), "", f"`benchmarks/sft.py {flags}`", "",
             (f"Step: {json.dumps({k: v for k, v in step.items() if v is not None})}; whole step {train_s:.0f} s; "
              f"{json.dumps(info)}"),
             f"Validation loss (step, loss): {[(s, round(v, 3)) for s, v in curve['val_loss']]}", "",
             "| prompts | items | base acc | tuned acc | tuned - base (paired) |", "|---|---|---|---|---|"]
    for chat, acc, err, diff, diff_se, n in rows:
        lines.append(f"| {'chat template' if chat else 'plain'} | {n:.0f} | {acc['base']:.3f} ± {err['base']:.3f} | "
                     f"{acc['tuned']:.3f} ± {err['tuned']:.3f} | {diff:+.3f} ± {diff_se:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
