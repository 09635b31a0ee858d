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

from farm.spec import DATA_AWARE, Sweep, grid_fields, uses_teacher

# Levels each exporter writes straight from a Hugging Face directory; every other level of the format is
# made from that format's BASE_LEVEL export, which is shared (llama.cpp quantizes from F16; ONNX Runtime's
# and NNCF's quantizers work on the fp32 ONNX graph / OpenVINO IR).
DIRECT = {"gguf": ("F32", "F16", "BF16"), "onnx": ("fp32",), "onnx_genai": ("fp32", "int4"), "openvino": ("fp32",),
          "torch": ("fp32", "nf4", "llm_int8")}
BASE_LEVEL = {"gguf": "F16", "onnx": "fp32", "openvino": "fp32"}

# The source files whose code decides each stage's output ({method}, {format}: the stage's own), and
# the libraries whose version does. A change to either gives the stage, and so what depends on it, a
# new id: it runs again, while every other stage stays reused.
PACKAGE = Path(__file__).parent
RUNTIME_MODULE = {"gguf": "runtimes/llamacpp_rt.py", "onnx": "runtimes/onnx_rt.py", "onnx_genai": "runtimes/onnx_rt.py", "openvino": "runtimes/openvino_rt.py",
                  "torch": "runtimes/torch_rt.py"}
CODE = {
    "base": ["models.py"],
    "reference": ["evaluate.py", "data.py", "models.py", "runtimes/torch_rt.py"],
    "compress": ["compress/{method}.py", "compress/kd.py", "compress/prune_layers.py", "models.py"],
    "export": ["export/{format}_export.py"],
    "evaluate": ["evaluate.py", "{runtime}"],
    "bench": ["bench.py", "{runtime}"],
}
SHARED_CODE = {"awq": ["compress/gptq.py"], "smoothquant": ["compress/awq.py"]}  # compress methods built on another method's module
RUNTIME_SHARED = {"gguf": ["runtimes/ggml_cpu.py"]}  # what a runtime imports that decides what it runs
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "llama-cpp-python", "optimum", "optimum-onnx",
             "onnxruntime", "onnxruntime-genai", "optimum-intel", "openvino", "nncf", "numpy")


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
    files += SHARED_CODE.get(method, []) if kind == "compress" else []
    files += RUNTIME_SHARED.get(fmt, []) if kind in ("evaluate", "bench") else []
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
    g = Grid()
    data = sweep.data.model_dump()
    base_params = sweep.base.model_dump()
    base = g.add("base", base_params)
    reference = g.add("reference", {"data": data}, (base,))

    exports = [v for e in sweep.exports for v in e.variants()]
    pipelines = expand_pipelines(sweep)
    baseline_export = {"format": "torch", "quant": "fp32"}
    plan = [(p, x, p == [] and x == baseline_export) for p in pipelines for x in exports]
    if not any(baseline for _, _, baseline in plan):
        plan.insert(0, ([], baseline_export, True))

    bench = sweep.bench.model_dump()
    for steps, exp, baseline in plan:
        fmt = exp["format"]
        runtime = exp.get("runtime", {})  # runtime options: the same exported file, measured another way
        exp_params = {k: v for k, v in exp.items() if k != "runtime"}
        model = base
        for step in steps:  # shared prefixes map to the same stage ids
            teacher = (base,) if uses_teacher(step["method"]) else ()
            model = g.add("compress", {"step": step}, (model, reference, *teacher), method=step["method"])
        if exp["quant"] in DIRECT[fmt]:
            export = g.add("export", exp_params, (model,), fmt=fmt)
        else:
            src = g.add("export", {"format": fmt, "quant": BASE_LEVEL[fmt]}, (model,), fmt=fmt)
            calib = (reference,) if exp.get("algorithm") in DATA_AWARE else ()
            export = g.add("export", exp_params, (src, *calib), fmt=fmt)
        rt = {"runtime": runtime} if runtime else {}
        evaluate = g.add("evaluate", {"data": data, **rt}, (export, reference), fmt=fmt)
        for target in sweep.targets:
            b = g.add("bench", {"bench": bench, "target": target.model_dump(), **rt}, (export, reference), fmt=fmt)
            spec = {
                "sweep": sweep.name,
                "base": base_params,
                "compress": steps,
                "export": exp,
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
