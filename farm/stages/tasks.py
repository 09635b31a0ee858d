"""Task accuracy through each cell's own runtime (farm/measure/tasks.py: lm-eval's multiple-choice tasks), after
the single-stream phase, on the cells the sweep's `tasks.cells` picks; the consistency gate (each runtime's
full-precision base cell against the PyTorch baseline) and every compressed cell's paired difference from the base
model exported the same way."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from farm.inputs.taskdata import NORMALISED, TASKS
from farm.plugin import Metric, Strict
from farm.stages.common import describe, model_dir, runtime_module, threads_here

KIND = "tasks"
SECTION = "tasks"
OPTIONAL = True
PER = "runtime"
INPUTS = ("export", "base")  # the base model's tokenizer
AFTER = True
METRICS = (
    Metric(rf"(acc|acc_norm)\.({'|'.join(TASKS)})", "max", label="task accuracy (lm-eval)", pattern=True),
    Metric("task_acc_mean", "max", label="mean task accuracy (lm-eval; acc_norm where a task has it)"),
    Metric("task_consistency", "max", label="agreement of the runtime's base cell with PyTorch's answers"),
    Metric(rf"(acc|acc_norm)_stderr\.({'|'.join(TASKS)})", "min", pattern=True),
    Metric(rf"acc_vs_base(_stderr)?\.({'|'.join(TASKS)})", "max", pattern=True),
    Metric("task_s_per_item", "min", "s"),
)


class TasksSpec(Strict):
    """Task accuracy (farm/measure/tasks.py): lm-eval's multiple-choice tasks scored through each cell's runtime."""
    items: dict[Literal[tuple(TASKS)], Annotated[int, Field(ge=1)] | Literal["all"]] = Field(  # type: ignore[valid-type]
        ..., min_length=1, description="Items per task, a seeded sample of its validation split (the same items "
        "for every cell), or 'all'; e.g. {piqa: 500, arc_easy: all}.")
    cells: Literal["front", "format_front", "all"] = Field(
        "front", description="After the single-stream phase: 'front' the cells on the sweep's Pareto front (again "
        "until every cell on the front is scored, when a task constraint drops one), plus each runtime's "
        "full-precision base cell (the consistency gate); 'format_front' also the front of each runtime's own cells "
        "(per_runtime of them, the best on promote.metric first), so that every runtime's best quantized cell is "
        "scored; 'all' every cell.")
    per_runtime: int = Field(2, ge=1, le=1000, description="With cells: format_front, at most this many of each "
                             "runtime's own front.")
    seed: int = Field(0, ge=0, description="Seed of the item sample.")
    chat: bool = Field(False, description="Score every prompt as a user message in the model's chat template "
                       "(lm-eval's apply_chat_template), the way an instruction-tuned model is used; false: the "
                       "task's plain prompt.")
    consistency: float = Field(
        0.9, ge=0, le=1, description="The gate: each runtime's full-precision base cell must pick the PyTorch "
        "baseline's answer on at least this share of the items, else every cell of that runtime is kept off the "
        "front (a runtime scoring at chance fails loudly).")


Config = TasksSpec  # the section's model, as every stage kind names it


def constraints(spec: dict) -> list[dict]:
    """The consistency gate, as a constraint of the front, when the sweep scores tasks."""
    return [{"metric": "task_consistency", "min": spec["tasks"]["consistency"]}] if spec.get("tasks") else []


def check(sweep) -> None:
    """A task metric needs the task scored (and acc_norm one that has it); in the objectives, on every cell."""
    for metric in dict.fromkeys(m for m in sweep.metrics_used() if any(x.matches(m) for x in METRICS)):
        key, _, task = metric.partition(".")
        if sweep.tasks is None or (task and task not in sweep.tasks.items):
            raise ValueError(f"'{metric}' is task accuracy: add tasks: {{items: {{{task or 'piqa'}: 200}}}} to the "
                             "sweep so that it is measured")
        if key == "acc_norm" and task not in NORMALISED:
            raise ValueError(f"'{metric}': lm-eval scores {task} by acc only (no length-normalised acc_norm)")
        if (metric in sweep.objectives or metric == sweep.promote.metric) and sweep.tasks.cells != "all":
            raise ValueError(f"'{metric}' as an objective or promote metric needs tasks.cells: all (every "
                             "candidate scored); with cells: front, use it in a constraint")


def held_out(sweep, pipelines: list[list[dict]]) -> dict:
    """The section as the stages read it: items and seed, and `held_out`, the tasks some step of the sweep trains
    on (a step's `task`), which every cell is then scored on the held-out half of (the base too, so that the
    comparison is on the same items)."""
    out = sweep.tasks.model_dump(include={"items", "seed"})
    if sweep.tasks.chat:  # only when set: the stage ids of sweeps that score plain prompts stay as they were
        out["chat"] = True
    trained = sorted({s["task"] for p in pipelines for s in p if s.get("task")} & set(out["items"]))
    return {**out, "held_out": trained} if trained else out  # unchanged (and its stage ids) without one


def scored(data: dict) -> dict[str, str]:
    """task -> 'held_out' (some step trains on it: its held-out half is scored, as held_out() says) or 'split'
    (a sample of the whole split), for the sweep as plain data; what an sft step keeps out of its chats."""
    section = data.get(SECTION)
    items = section.get("items") if isinstance(section, dict) else None
    if not isinstance(items, dict):
        return {}
    pipelines = data.get("pipelines") if isinstance(data.get("pipelines"), list) else []
    trained = {s["task"] for p in pipelines if isinstance(p, list) for s in p
               if isinstance(s, dict) and isinstance(s.get("task"), str)}
    return {t: "held_out" if t in trained else "split" for t in sorted(t for t in items if t in TASKS)}


def params(ctx: dict) -> dict | None:
    if ctx["sweep"].tasks is None:
        return None
    return {"tasks": held_out(ctx["sweep"], ctx["pipelines"]), "runtime": ctx["runtime"]}


def code(params: dict) -> list[str]:
    return ["farm.measure.tasks", runtime_module(params["runtime"])]


def run(stage, deps: list[dict], out: Path) -> dict:
    from farm.measure.tasks import score_isolated

    export, base = deps
    runtime, tasks = stage.params["runtime"], stage.params["tasks"]
    result = score_isolated(runtime, Path(export["artifact"]), model_dir(base), tasks["items"], tasks["seed"],
                            threads_here(), out / "tasks.json", describe(export, runtime), tasks.get("held_out", []),
                            tasks.get("chat", False))
    return {"metrics": result["metrics"], "items": result["items"], "cost": result["cost"]}


# ---- the phase: after every cell has its single-stream figures
def gate_cells(grid) -> list:
    """The cells the consistency gate compares with the PyTorch baseline: each runtime's base model at its
    format's full-precision level (gguf F16, onnx/openvino fp32, ...), and the baseline itself."""
    from farm.export import FORMATS

    return [c for c in grid.cells if KIND in c.stages and (c.baseline or not c.spec["compress"] and
            c.spec["export"]["quant"] == FORMATS.options(c.spec["export"]["format"]).BASE_LEVEL)]


def result_of(outcome: dict, cell) -> dict | None:
    """The cell's task-accuracy result, if its tasks stage ran and did not fail."""
    result, error = outcome.get(cell.stages.get(KIND), (None, 1))
    return result if error is None else None


def consistency_of(grid, outcome: dict, label) -> tuple[dict[str, float], list[str]]:
    """cell id -> the share of items on which its runtime setting's full-precision base cell picked the PyTorch
    baseline's answer (the lowest, if it has several), for every scored cell; and a line per runtime setting."""
    from farm.measure.tasks import agreement

    def setting(c) -> str:
        return json.dumps(c.spec["export"]["runtime"], sort_keys=True)

    baseline = next((result_of(outcome, c) for c in grid.cells if c.baseline and KIND in c.stages), None)
    if baseline is None:
        return {}, ["farm: tasks: the PyTorch baseline has no task scores; no runtime is checked against it"]
    share, lines = {}, []
    for c in gate_cells(grid):
        mine = result_of(outcome, c)
        if mine is None:
            if not c.baseline and c.stages[KIND] in outcome:  # it failed: its runtime setting cannot be checked
                share[setting(c)] = math.nan
                lines.append(f"farm: tasks: {label(c)} has no task scores (its tasks stage failed): the consistency "
                             "gate cannot check its runtime setting, whose cells are kept off the front")
            continue
        value, n = agreement(mine["items"], baseline["items"])
        if not math.isnan(share.get(setting(c), 1.0)):
            share[setting(c)] = min(value, share.get(setting(c), 1.0))
        if not c.baseline:
            lines.append(f"farm: tasks: {label(c)} picks the PyTorch baseline's answer on {100 * value:.1f} % "
                         f"of {n} items")
    gated = {setting(c) for c in gate_cells(grid)}
    for s in [s for s in dict.fromkeys(setting(c) for c in grid.cells if c.stages.get(KIND) in outcome)
              if s not in gated]:
        lines.append(f"farm: tasks: WARNING: the sweep has no full-precision base cell of runtime setting {s}: its "
                     "cells' answers are not checked against PyTorch's (export the base model at the format's "
                     "full-precision level to gate them)")
    return {c.id: share[setting(c)] for c in grid.cells
            if c.stages.get(KIND) in outcome and setting(c) in share}, lines


def vs_base(grid, outcome: dict) -> dict[str, dict[str, float]]:
    """cell id -> `acc_vs_base.<task>` and `acc_vs_base_stderr.<task>`: the paired difference (farm.measure.tasks
    .paired) between the cell's accuracy and that of the uncompressed base model exported the same way (same
    format, level, runtime and target), for every scored cell with a compression and such a twin."""
    from farm.measure.tasks import paired

    def key(c) -> str:
        return json.dumps([c.spec["export"], c.spec["target"]["name"]], sort_keys=True, default=str)

    twins = {key(c): result_of(outcome, c) for c in grid.cells
             if not c.spec["compress"] and result_of(outcome, c) is not None}
    out = {}
    for c in grid.cells:
        mine, base = result_of(outcome, c), twins.get(key(c))
        if not c.spec["compress"] or mine is None or base is None:
            continue
        for t in mine["items"]:
            d = paired(mine["items"][t], base["items"].get(t, {"doc_ids": []}))
            if d is not None:
                out.setdefault(c.id, {}).update({f"acc_vs_base.{t}": d[0], f"acc_vs_base_stderr.{t}": d[1]})
    return out


def phase(ctx) -> None:
    """Task accuracy of every cell (tasks.cells 'all'), or of the gate's cells, the Pareto front (and with
    'format_front' each runtime's own best cells), then again until every cell on the front has been scored (a
    task constraint can drop a front cell and let in one that was dominated by it)."""
    grid, sweep, outcome = ctx.grid, ctx.sweep, ctx.outcome
    cfg = sweep.tasks
    objectives, constraints = ctx.objectives(), ctx.constraints()
    later = ctx.later()
    rows = ctx.rows()
    finished = {r["id"] for r in rows}
    first = {c.id for c in gate_cells(grid)}
    if cfg.cells == "format_front":  # each runtime's own best cells, whether or not on the sweep's front
        metric, direction = ctx.promote_metric()
        first |= set(ctx.pareto.served(rows, {c.id: c.spec["export"]["runtime"]["name"] for c in grid.cells},
                                       objectives, constraints, "format_front", cfg.per_runtime, metric, direction,
                                       later=later))
    first |= {i for i, st in ctx.pareto.front(rows, objectives, constraints, later=later).items() if st["pareto"]}
    todo = [c for c in grid.cells if c.id in finished and KIND in c.stages and (cfg.cells == "all" or c.id in first)]
    seen: set[str] = set()
    while todo:
        todo = [c for c in todo if c.stages[KIND] not in seen]
        stages = list(dict.fromkeys(c.stages[KIND] for c in todo))
        if not stages:
            break
        ctx.say(f"\nfarm: tasks ({', '.join(f'{t} {n}' for t, n in cfg.items.items())} items) on "
                f"{len(stages)} runtime setting(s) of {len(todo)} cell(s): {', '.join(ctx.label(c) for c in todo)}")
        ctx.run(stages)
        seen |= set(stages)
        if cfg.cells == "all":
            break
        ctx.extra.update({cid: {"task_consistency": v}
                          for cid, v in consistency_of(grid, outcome, ctx.label)[0].items()})
        status = ctx.pareto.front(ctx.rows(), objectives, constraints, later=later)
        todo = [c for c in grid.cells if c.id in status and status[c.id]["pareto"] and KIND in c.stages
                and c.stages[KIND] not in seen]
    consistency, lines = consistency_of(grid, outcome, ctx.label)
    ctx.extra.update({cid: {"task_consistency": v} for cid, v in consistency.items()})
    for line in lines:
        ctx.say(line)
    paired = vs_base(grid, outcome)
    for cell in grid.cells:
        if cell.stages.get(KIND) not in outcome or cell.id not in finished:
            continue
        result, error = outcome[cell.stages[KIND]]
        label = ctx.label(cell)
        if error is not None:
            ctx.log.log_update(cell, KIND, None, error)
            ctx.say(f"farm: tasks {label}: FAILED: {str(error).splitlines()[0][:300]}")
            continue
        metrics = {**result["metrics"], **paired.get(cell.id, {})}
        gate = consistency.get(cell.id)
        if gate is not None:
            metrics["task_consistency"] = gate
        ctx.log.log_update(cell, KIND, {
            "metrics": [[k, float(v), 0] for k, v in metrics.items()],
            "tags": {"farm.tasks.stage": result.get("stage", ""),
                     "farm.cached.tasks": str(result.get("cached", False)).lower()},
            "files": {"tasks.json": {"cost": result["cost"], "items": result["items"]}}}, None)
        m = metrics
        vs = {t: f" ({m[f'acc_vs_base.{t}']:+.3f}±{m[f'acc_vs_base_stderr.{t}']:.3f} vs the base, paired)"
              for t in cfg.items if f"acc_vs_base.{t}" in m}
        ctx.say(f"farm: tasks {label}: " + "  ".join(f"{t} {m[f'acc.{t}']:.3f}±{m[f'acc_stderr.{t}']:.3f}"
                                                    f"{vs.get(t, '')}" for t in cfg.items)
                + f"  mean {m['task_acc_mean']:.3f}  ({m['task_s_per_item']:.2f} s/item)"
                + (f"  FAILS THE CONSISTENCY GATE ({100 * gate:.1f} % < {100 * cfg.consistency:.0f} % agreement "
                   "with PyTorch): kept off the front" if gate is not None and gate < cfg.consistency else ""))


# ---- what the report and the front's table show of it
def columns(spec: dict) -> list[str]:
    tasks = list((spec.get(SECTION) or {}).get("items") or {})
    return [f"acc.{t}" for t in tasks] + ["task_acc_mean"] if tasks else []


def report(spec: dict, rows: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    tasks = list((spec.get(SECTION) or {}).get("items") or {})
    return [("Task accuracy", *_task_table(rows, tasks))] if tasks else []


def _task_table(rows: list[dict], tasks: list[str]) -> tuple[list[str], list[list[str]]]:
    """Per scored cell and task: accuracy ± its binomial stderr, and the paired difference from the base model
    exported the same way (`acc_vs_base`, the driver's) ± its stderr, where the cell has such a twin."""
    head = ["cell"] + [h for t in tasks for h in (t, f"{t} − base (paired)")]
    body = []
    for r in sorted(rows, key=lambda r: (r["target"], r["label"])):
        m = r["metrics"]
        if not any(f"acc.{t}" in m for t in tasks):
            continue
        cells = [r["label"]]
        for t in tasks:
            cells.append(f"{m[f'acc.{t}']:.3f} ± {m.get(f'acc_stderr.{t}', float('nan')):.3f}"
                         if f"acc.{t}" in m else "-")
            cells.append(f"{m[f'acc_vs_base.{t}']:+.3f} ± {m.get(f'acc_vs_base_stderr.{t}', float('nan')):.3f}"
                         if f"acc_vs_base.{t}" in m else "-")
        body.append(cells)
    return head, body
