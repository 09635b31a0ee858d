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

from farm.export import BASELINE, FORMATS
from farm.inputs.modelref import contents
from farm.plan import codeid
from farm.stages import CHAIN, STAGES
from farm.stages.common import declared, measurements, scored_tasks
from farm.sweep.spec import Sweep, grid_fields, step_options, uses_teacher

BASELINE_RUNTIME = {"name": FORMATS.options(BASELINE["format"]).RUNTIME}
BASE, REFERENCE, COMPRESS, EXPORT = CHAIN


def _file(module: str) -> str:
    rel = codeid.module_file(module)
    if rel is None:  # a plug-in registered from outside farm/ (a test's dummy): hash its own source
        import importlib.util

        return str(Path(importlib.util.find_spec(module).origin))
    return rel


def code_version(kind: str, params: dict) -> dict:
    """The code that decides a stage: its kind's module and the farm modules the kind names for these params
    (a method's, a format's, a runtime's), with their import closures (farm.plan.codeid). Change any of it and
    the stage, and what depends on it, gets a new id and runs again; every other stage stays reused."""
    module = STAGES.get(kind)
    return codeid.code_version([_file(m) for m in [module.__name__, *module.code(params)]])


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
    kind: str  # a stage kind (farm/stages)
    params: dict
    deps: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.id}"


@dataclass
class Cell:
    id: str
    spec: dict  # the cell's full spec: base, compress steps, export, target, bench, data
    export: str  # stage ids
    stages: dict[str, str] = field(default_factory=dict)  # measurement kind -> its stage, for the kinds that apply
    baseline: bool = False
    compress: tuple[str, ...] = ()  # the compression steps' stages, in order

    def params(self) -> dict[str, str]:
        return flatten_cell(self.spec)


@dataclass
class Grid:
    stages: dict[str, Stage] = field(default_factory=dict)  # insertion order is a topological order
    cells: list[Cell] = field(default_factory=list)

    def add(self, kind: str, params: dict, deps: tuple[str, ...] = ()) -> str:
        sid = content_id({"kind": kind, "params": params, "deps": deps, "code": code_version(kind, params)})
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


def build(sweep: Sweep) -> Grid:
    """The production chain (base -> reference -> compress steps -> export) is the grid's own structure; every
    measurement kind (farm/stages: PER, INPUTS, params) attaches to each export once per runtime setting, or once
    per runtime setting and target, where its params() says it applies. A cell is an export x runtime setting x
    target, with the measurement stages that apply to it."""
    g = Grid()
    data = sweep.data.model_dump()
    base_params = {**sweep.base.model_dump(), "contents": contents(sweep.base.model, sweep.base.revision)}
    base = g.add(BASE, base_params)
    reference = g.add(REFERENCE, with_digests({"data": data}, data["files"]), (base,))

    exports = [(e, v) for e in sweep.exports for v in e.variants()]
    pipelines = expand_pipelines(sweep)
    baseline = FORMATS.options(BASELINE["format"])(**BASELINE)  # the base model in PyTorch, fp32
    [baseline_variant] = baseline.variants()
    plan = [(p, e, v) for p in pipelines for e, v in exports]
    if not any(p == [] and v == baseline_variant and BASELINE_RUNTIME in e.runtimes() for p, e, v in plan):
        plan.insert(0, ([], baseline, baseline_variant))

    scored = scored_tasks(sweep.model_dump())  # task items the sweep scores, which a step's data must not hold
    kinds = [(k, declared(k, "PER"), declared(k, "INPUTS")) for k in measurements()]
    # the sections every cell is measured under (base, data, bench, ...), in its spec and flat params
    sections = {m.SECTION: getattr(sweep, m.SECTION).model_dump() for m in STAGES.modules()
                if declared(m, "SECTION") and not declared(m, "AFTER") and not declared(m, "OPTIONAL")}
    first = [k for k in measurements(after=False)]  # a cell's id: its single-stream measurements
    for steps, entry, variant in plan:
        model, chain = base, []
        for step in steps:  # shared prefixes map to the same stage ids
            teacher = (base,) if uses_teacher(step["method"]) else ()
            ran = step_options(step["method"]).with_scored(step, scored)  # what the sweep scores, if it reads it
            model = g.add(COMPRESS, with_digests({"step": ran}, step.get("files") or []), (model, reference, *teacher))
            chain.append(model)
        src = model
        if variant.source is not None:  # made from the format's shared base-level export
            src = g.add(EXPORT, variant.source, (model, *checked(variant.source, reference)))
        calib = (reference,) if variant.calibrated else checked(variant.params, reference)
        export = g.add(EXPORT, variant.params, (src, *calib))
        roles = {EXPORT: export, REFERENCE: reference, BASE: base}
        for runtime in entry.runtimes():  # the same exported file, measured by each runtime setting
            ctx = {"sweep": sweep, "pipelines": pipelines, "data": data, "runtime": runtime, "export": variant.params}
            per_runtime = {k: STAGES.get(k).params(ctx) for k, per, _ in kinds if per == "runtime"}
            for target in sweep.targets:
                tctx = {**ctx, "target": target.model_dump()}
                measured = {}
                for kind, per, inputs in kinds:
                    params = per_runtime[kind] if per == "runtime" else STAGES.get(kind).params(tctx)
                    if params is not None:  # its inputs by role: the chain's stages, or the cell's measurements
                        measured[kind] = g.add(kind, params, tuple({**roles, **measured}[r] for r in inputs))
                spec = {"sweep": sweep.name, "compress": steps, "export": {**variant.params, "runtime": runtime},
                        "target": target.model_dump(), **sections}
                is_baseline = steps == [] and variant == baseline_variant and runtime == BASELINE_RUNTIME
                g.cells.append(Cell(content_id([measured[k] for k in first if k in measured]), spec, export,
                                    measured, is_baseline, tuple(chain)))
    return g


def checked(params: dict, reference: str) -> tuple[str, ...]:
    """A full-precision level is checked against its checkpoint on the reference's tokens (farm.measure.fidelity)."""
    return (reference,) if params["quant"] in FORMATS.options(params["format"]).FULL_PRECISION else ()


def flatten_cell(spec: dict) -> dict[str, str]:
    """The cell spec as flat MLflow params: compress.method, compress.prune_layers.drop, export.quant, bench.*, ..."""
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

    for key, value in spec.items():
        if key not in ("sweep", "compress"):
            walk(key, value)
    return out
