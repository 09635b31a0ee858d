"""Contamination, planted and caught: a share of a task's held-out items (the ones the sweep scores) written as
instruction chats into a JSONL file, for an sft step to train on beside the task's train half
(benchmarks/sft_planted.yaml). The sweep trains twice: with decontamination (the planted chats are caught and
dropped: farm/inputs/curate.py) and without it (they are trained on); `report` then reads each cell's per-item
picks from MLflow and gives the accuracy on the planted and on the clean held-out items apart.

    .venv/bin/python benchmarks/sft_planted.py plant --task arc_easy --share 0.5
    .venv/bin/farm validate benchmarks/sft_planted.yaml      # refused at the default max_contaminated
    .venv/bin/farm submit benchmarks/sft_planted.yaml
    .venv/bin/python benchmarks/sft_planted.py report sft_planted
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plant(task: str, share: float, seed: int) -> None:
    from farm.inputs.instructions import from_task
    from farm.inputs.taskdata import halves

    held = halves(task)[1]
    ids = sorted(random.Random(f"plant:{seed}:{task}").sample(held, round(len(held) * share)))
    out = HERE / f"sft_planted_{task}.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for chat in from_task(task, ids):
            f.write(json.dumps({"messages": chat}) + "\n")
    (HERE / f"sft_planted_{task}.ids.json").write_text(json.dumps(ids))
    print(f"{out}: {len(ids)} of the {len(held)} held-out {task} items, as chats")


def accuracy(ok: list[int]) -> str:
    n = len(ok)
    p = sum(ok) / max(n, 1)
    return f"{p:.3f} ± {math.sqrt(p * (1 - p) / max(n - 1, 1)):.3f} (n={n})"


def report(name: str, task: str) -> None:
    from farm.record.queries import cell_runs, latest_sweep_run

    planted = set(json.loads((HERE / f"sft_planted_{task}.ids.json").read_text()))
    c, _, parent = latest_sweep_run(name)
    print(f"| cell | {task} held-out, all | planted items | clean items | sft.curate.contaminated.{task} | kept |")
    print("|---|---|---|---|---|---|")
    for r in cell_runs(parent):
        with tempfile.TemporaryDirectory() as d:
            try:
                stages = json.loads(Path(c.download_artifacts(r.info.run_id, "stages.json", d)).read_text())
            except Exception:  # a cell without its artifacts (failed): nothing to read
                continue
        items = (stages.get("tasks") or {}).get("items", {}).get(task)
        if not items:
            continue
        ok = {i: int(p == t) for i, p, t in zip(items["doc_ids"], items["pick_norm"], items["target"])}
        m = r.data.metrics
        print(f"| {r.data.tags.get('farm.label', r.info.run_name)} | {accuracy(list(ok.values()))} | "
              f"{accuracy([v for i, v in ok.items() if i in planted])} | "
              f"{accuracy([v for i, v in ok.items() if i not in planted])} | "
              f"{m.get(f'sft.curate.contaminated.{task}', '')} | {m.get('sft.curate.kept', '')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plant")
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--share", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report")
    r.add_argument("name")
    r.add_argument("--task", default="arc_easy")
    a = ap.parse_args()
    plant(a.task, a.share, a.seed) if a.cmd == "plant" else report(a.name, a.task)


if __name__ == "__main__":
    main()
