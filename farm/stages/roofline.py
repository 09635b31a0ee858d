"""The memory roofline of each benchmark (farm/measure/roofline.py): the bytes a decode step reads, from the
artifact, against the node's memory bandwidth measured with the benchmark's threads on its cores; how much of what
the memory allows a runtime gets (roofline_efficiency). A measurement of its own, after the cell's benchmark, on
a node of the same target, alone there like a benchmark (the bandwidth is measured once per node and cached)."""

from __future__ import annotations

import json
from pathlib import Path

from farm.plugin import Metric
from farm.stages.common import describe

KIND = "roofline"
PER = "target"
INPUTS = ("export", "bench")  # the benchmark's decode speed, threads, cores and runtime settings
EXCLUSIVE = True
PATHS = ("roofline_json",)
METRICS = (
    Metric("mem_bandwidth_gbs", "max", "GB/s", "memory bandwidth, read (GB/s)"),
    Metric("bytes_per_token_mb", "min", "MB", "bytes a decode step reads (MB)"),
    Metric("weight_mb_per_token", "min", "MB", "weight bytes a decode step reads (MB)"),
    Metric("roofline_decode_tok_s", "max", "tok/s", "decode tokens/s the memory allows"),
    Metric("roofline_efficiency", "max", label="share of the memory roofline"),
)


def params(ctx: dict) -> dict:
    bench = ctx["sweep"].bench
    return {"format": ctx["export"]["format"], "target": ctx["target"], "runtime": ctx["runtime"], "reuse": bench.reuse,
            "context": bench.prompt_tokens + bench.decode_tokens / 2}  # the mean context of a decode step


def code(params: dict) -> list[str]:
    from farm.export import FORMATS

    return ["farm.measure.roofline", FORMATS.module_name(params["format"])]  # the format reads its own bytes


def reuse(stage) -> str:
    return stage.params["reuse"]  # the bandwidth is the node's: as the benchmark's own policy says


def run(stage, deps: list[dict], out: Path) -> dict:
    from farm.measure.isolate import run_child, timeout_for

    export, bench = deps
    raw = json.loads(Path(bench["bench_json"]).read_text())
    args = ["-m", "farm.measure.roofline", "--format", export["format"], "--artifact", export["artifact"],
            "--decode-tok-s", str(raw["decode_tok_s"]), "--context", str(stage.params["context"]),
            "--threads", str(raw["threads"]), "--cores", json.dumps(raw.get("cores") or []),
            "--pinning", raw.get("pinning", "compact"), "--settings", json.dumps(raw.get("runtime_settings") or {}),
            "--out", str(out / "roofline.json")]
    run_child(args, "the memory roofline", f"reading the bytes a decode step of {describe(export, stage.params['runtime'])} reads",
              timeout_for(export["artifact"], 64))  # the artifact read a few times, a bandwidth probe
    result = json.loads((out / "roofline.json").read_text())
    return {"metrics": {m.name: result[m.name] for m in METRICS if m.name in result}, "roofline_json": "roofline.json",
            "contaminated": bool(bench.get("contaminated"))}  # its efficiency is of that decode speed


def stands(result: dict) -> bool:
    return not result.get("contaminated")  # measured again with its benchmark
