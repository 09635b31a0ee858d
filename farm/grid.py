"""Expand a sweep into cells and a stage DAG with content-addressed ids. Pure: no torch, ray or mlflow.

cells = compression pipeline x export (format, quant) x benchmark target, plus the PyTorch fp32
baseline on every target. A stage shared by several cells (the base model, a pruned model feeding
several exports, the F16 GGUF that every GGUF quant level starts from) appears once.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from farm.spec import Sweep

# GGUF levels that llama.cpp's converter writes directly; every other level is quantized from F16.
GGUF_DIRECT = ("F32", "F16", "BF16")

# The source files whose code decides each stage's output ({method}, {format}: the stage's own), and
# the libraries whose version does. A change to either gives the stage, and so what depends on it, a
# new id: it runs again, while every other stage stays reused.
PACKAGE = Path(__file__).parent
RUNTIME_MODULE = {"gguf": "runtimes/llamacpp_rt.py", "torch": "runtimes/torch_rt.py"}
CODE = {
    "base": ["models.py"],
    "reference": ["evaluate.py", "data.py", "models.py", "runtimes/torch_rt.py"],
    "compress": ["compress/{method}.py", "models.py"],
    "export": ["export/{format}_export.py"],
    "evaluate": ["evaluate.py", "{runtime}"],
    "bench": ["bench.py", "{runtime}"],
}
LIBRARIES = ("torch", "transformers", "llama-cpp-python", "numpy")


@functools.cache
def _file_hash(rel: str) -> str:
    path = PACKAGE / rel
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "absent"


@functools.cache
def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    out = {}
    for lib in names:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = "absent"
    return out


def code_version(kind: str, method: str = "", fmt: str = "") -> dict:
    files = [f.format(method=method, format=fmt, runtime=RUNTIME_MODULE.get(fmt, "")) for f in CODE[kind]]
    return {"files": {f: _file_hash(f) for f in files}, "libraries": library_versions()}


def content_id(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Stage:
    id: str
    kind: str  # base | reference | compress | export | evaluate | bench
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

    def params(self) -> dict[str, str]:
        return flatten_cell(self.spec)


@dataclass
class Grid:
    stages: dict[str, Stage] = field(default_factory=dict)  # insertion order is a topological order
    cells: list[Cell] = field(default_factory=list)

    def add(self, kind: str, params: dict, deps: tuple[str, ...] = (), method: str = "", fmt: str = "") -> str:
        sid = content_id({"kind": kind, "params": params, "deps": deps, "code": code_version(kind, method, fmt)})
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
    """A step whose fields hold lists is a grid: one step per combination."""
    keys = [k for k, v in step.items() if isinstance(v, list)]
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
    g = Grid()
    data = sweep.data.model_dump()
    base_params = sweep.base.model_dump()
    base = g.add("base", base_params)
    reference = g.add("reference", {"data": data}, (base,))

    exports = [(e.format, q) for e in sweep.exports for q in e.levels()]
    pipelines = expand_pipelines(sweep)
    plan = [(p, f, q, False) for p in pipelines for f, q in exports]
    if ([], "torch", "fp32") not in [(p, f, q) for p, f, q, _ in plan]:
        plan.insert(0, ([], "torch", "fp32", True))
    else:
        plan = [(p, f, q, (p, f, q) == ([], "torch", "fp32")) for p, f, q, _ in plan]

    bench = sweep.bench.model_dump()
    for steps, fmt, quant, baseline in plan:
        model = base
        for step in steps:  # shared prefixes map to the same stage ids
            model = g.add("compress", {"step": step}, (model, reference), method=step["method"])
        if fmt == "gguf" and quant not in GGUF_DIRECT:
            src = g.add("export", {"format": "gguf", "quant": "F16"}, (model,), fmt=fmt)
            export = g.add("export", {"format": fmt, "quant": quant}, (src,), fmt=fmt)
        else:
            export = g.add("export", {"format": fmt, "quant": quant}, (model,), fmt=fmt)
        evaluate = g.add("evaluate", {"data": data}, (export, reference), fmt=fmt)
        for target in sweep.targets:
            b = g.add("bench", {"bench": bench, "target": target.model_dump()}, (export, reference), fmt=fmt)
            spec = {
                "sweep": sweep.name,
                "base": base_params,
                "compress": steps,
                "export": {"format": fmt, "quant": quant},
                "target": target.model_dump(),
                "bench": bench,
                "data": data,
            }
            g.cells.append(Cell(content_id([evaluate, b]), spec, evaluate, b, export, baseline))
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
