"""Expand a sweep into cells and a stage DAG with content-addressed ids. Pure: no torch, ray or mlflow.

cells = compression pipeline x export (format, quant) x benchmark target, plus the PyTorch fp32
baseline on every target. A stage shared by several cells (the base model, a pruned model feeding
several exports, the F16 GGUF that every GGUF quant level starts from) appears once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm import codeid
from farm.compress import METHODS
from farm.export import FORMATS
from farm.runtimes import RUNTIMES
from farm.serve import ENGINES
from farm.spec import Sweep, grid_fields, uses_teacher

# The farm module whose code does each kind of stage's work; its import closure (farm.codeid), the versions
# of the libraries that closure imports and, where it reads the embedded corpus, the Python version make the
# stage's code id. Change any of it and the stage, and what depends on it, gets a new id and runs again;
# every other stage stays reused.
BASELINE_RUNTIME = {"name": "torch"}
WORKER = {"base": "models.py", "reference": "evaluate.py", "evaluate": "evaluate.py", "bench": "bench.py",
          "serve": "serve/bench.py", "tasks": "tasks.py"}


def _file(module: str) -> str:
    rel = codeid.module_file(module)
    if rel is None:  # a plug-in registered from outside farm/ (a test's dummy): hash its own source
        import importlib.util

        return str(Path(importlib.util.find_spec(module).origin))
    return rel


def code_version(kind: str, method: str = "", fmt: str = "", runtime: str = "") -> dict:
    if kind == "compress":
        entries = [_file(METHODS.module_name(method))]
    elif kind == "export":
        entries = [_file(FORMATS.module_name(fmt))]
    elif kind == "serve":  # the engine module is imported by name at run time: named here
        entries = [WORKER[kind], _file(ENGINES[runtime])]
    else:
        entries = [WORKER[kind]] + ([_file(RUNTIMES.module_name(runtime))] if runtime else [])
    return codeid.code_version(entries)


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    return {n: codeid.distribution_version(n) for n in names}


def file_digests(files: list[str]) -> dict[str, str]:
    """What the named files hold (sha256 of their bytes, by path): a stage reading a user's files must get a new
    id when the files change, not only when their paths do; otherwise a resubmitted sweep reuses a result made
    from the old text."""
    return {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}


def with_digests(params: dict, files: list[str]) -> dict:
    return {**params, "files_sha256": file_digests(files)} if files else params  # ids without files unchanged


def content_id(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Stage:
    id: str
    kind: str  # base | reference | compress | export | evaluate | bench | tasks | serve
    params: dict
    deps: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.id}"


@dataclass
class Cell:
    id: str
    spec: dict  # the cell's full spec: base, compress steps, export, target, bench, data
    evaluate: str  # stage ids
    bench: str
    export: str
    baseline: bool = False
    serve: str | None = None  # the serve benchmark's stage, if the sweep has one and the runtime an engine
    tasks: str | None = None  # the task-accuracy stage, if the sweep scores tasks
    compress: tuple[str, ...] = ()  # the compression steps' stages, in order

    def params(self) -> dict[str, str]:
        return flatten_cell(self.spec)


@dataclass
class Grid:
    stages: dict[str, Stage] = field(default_factory=dict)  # insertion order is a topological order
    cells: list[Cell] = field(default_factory=list)

    def add(self, kind: str, params: dict, deps: tuple[str, ...] = (), **code) -> str:
        sid = content_id({"kind": kind, "params": params, "deps": deps, "code": code_version(kind, **code)})
        if sid not in self.stages:
            self.stages[sid] = Stage(sid, kind, params, deps)
        return sid

    def closure(self, stage_ids: list[str]) -> list[Stage]:
        """The stages needed for the given ones, in topological order."""
        need: set[str] = set()
        todo = list(stage_ids)
        while todo:
            sid = todo.pop()
            if sid not in need:
                need.add(sid)
                todo.extend(self.stages[sid].deps)
        return [s for sid, s in self.stages.items() if sid in need]


def expand_step(step: dict) -> list[dict]:
    """A step whose grid fields (spec: GRID) hold lists is a grid: one step per combination."""
    keys = [k for k in grid_fields(step["method"]) if isinstance(step.get(k), list)]
    if not keys:
        return [step]
    out = []
    for combo in itertools.product(*(step[k] for k in keys)):
        out.append({**step, **dict(zip(keys, combo))})
    return out


def expand_pipelines(sweep: Sweep) -> list[list[dict]]:
    seen, out = set(), []
    for pipeline in sweep.pipelines:
        steps = [s.model_dump() for s in pipeline if s.method != "none"]
        for combo in itertools.product(*(expand_step(s) for s in steps)):
            key = json.dumps(combo, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(list(combo))
    return out


def held_out_tasks(sweep: Sweep, pipelines: list[list[dict]]) -> dict | None:
    """The tasks section as the tasks stages read it: items and seed, and `held_out`, the tasks some step of
    the sweep trains on (sft's task), which every cell is then scored on the held-out half of (the base too,
    so that the comparison is on the same items)."""
    if sweep.tasks is None:
        return None
    out = sweep.tasks.model_dump(include={"items", "seed"})
    if sweep.tasks.chat:  # only when set: the stage ids of sweeps that score plain prompts stay as they were
        out["chat"] = True
    trained = sorted({s["task"] for p in pipelines for s in p if s.get("method") == "sft" and s.get("task")}
                     & set(out["items"]))
    return {**out, "held_out": trained} if trained else out  # unchanged (and its stage ids) without one


def build(sweep: Sweep) -> Grid:
    g = Grid()
    data = sweep.data.model_dump()
    base_params = sweep.base.model_dump()
    base = g.add("base", base_params)
    reference = g.add("reference", with_digests({"data": data}, data["files"]), (base,))

    exports = [(e, v) for e in sweep.exports for v in e.variants()]
    pipelines = expand_pipelines(sweep)
    baseline = FORMATS.options("torch")(format="torch", quant="fp32")  # the base model in PyTorch, fp32
    [baseline_variant] = baseline.variants()
    plan = [(p, e, v) for p in pipelines for e, v in exports]
    if not any(p == [] and v == baseline_variant and BASELINE_RUNTIME in e.runtimes() for p, e, v in plan):
        plan.insert(0, ([], baseline, baseline_variant))

    bench = sweep.bench.model_dump()
    scored = held_out_tasks(sweep, pipelines)
    for steps, entry, variant in plan:
        fmt = variant.params["format"]
        model, chain = base, []
        for step in steps:  # shared prefixes map to the same stage ids
            teacher = (base,) if uses_teacher(step["method"]) else ()
            model = g.add("compress", with_digests({"step": step}, step.get("files") or []),
                          (model, reference, *teacher), method=step["method"])
            chain.append(model)
        src = model
        if variant.source is not None:  # made from the format's shared base-level export
            src = g.add("export", variant.source, (model,), fmt=fmt)
        calib = (reference,) if variant.calibrated else ()
        export = g.add("export", variant.params, (src, *calib), fmt=fmt)
        for runtime in entry.runtimes():  # the same exported file, measured by each runtime setting
            evaluate = g.add("evaluate", {"data": data, "runtime": runtime}, (export, reference),
                             runtime=runtime["name"])
            tasks = None  # scored after the single-stream phase, with the base model's tokenizer
            if sweep.tasks is not None:
                tasks = g.add("tasks", {"tasks": scored, "runtime": runtime}, (export, base), runtime=runtime["name"])
            for target in sweep.targets:
                b = g.add("bench", {"bench": bench, "target": target.model_dump(), "runtime": runtime},
                          (export, reference), runtime=runtime["name"])
                spec = {
                    "sweep": sweep.name,
                    "base": base_params,
                    "compress": steps,
                    "export": {**variant.params, "runtime": runtime},
                    "target": target.model_dump(),
                    "bench": bench,
                    "data": data,
                }
                is_baseline = steps == [] and variant == baseline_variant and runtime == BASELINE_RUNTIME
                serve = None
                if sweep.serve is not None and runtime["name"] in ENGINES:  # submitted after the bench phase
                    serve = g.add("serve", {"serve": sweep.serve.model_dump(), "target": target.model_dump(),
                                            "runtime": runtime}, (export, reference, base), runtime=runtime["name"])
                g.cells.append(Cell(content_id([evaluate, b]), spec, evaluate, b, export, is_baseline, serve, tasks,
                                     tuple(chain)))
    return g


def flatten_cell(spec: dict) -> dict[str, str]:
    """The cell spec as flat MLflow params: compress.method, compress.prune_layers.drop, export.quant, ..."""
    out: dict[str, str] = {}
    steps = spec["compress"]
    out["compress.method"] = "+".join(s["method"] for s in steps) or "none"
    for s in steps:
        for k, v in s.items():
            if k != "method":
                out[f"compress.{s['method']}.{k}"] = str(v)

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict) and obj:
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = json.dumps(obj) if isinstance(obj, (list, dict)) else str(obj)

    for key in ("base", "export", "target", "bench", "data"):
        walk(key, spec[key])
    return out
