"""Speed and memory, one stream, process-isolated, alone on a node of the cell's target (farm/measure/speed.py):
prefill and decode tokens/s, TTFT, per-token latency, peak RSS and the node's other load during the measurement.
Reads the sweep's `bench` section."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from farm import nodes, storage
from farm.plugin import Metric, Strict
from farm.stages.common import describe, runtime_module, threads_here

KIND = "bench"
SECTION = "bench"
PER = "target"  # speed is the node's: one per runtime setting and target
INPUTS = ("export", "reference")
EXCLUSIVE = True
PATHS = ("bench_json",)
METRICS = (
    Metric("decode_tok_s", "max", "tok/s", "decode tokens/s, one stream (higher is better)", short="decode", fmt=".1f"),
    Metric("prefill_tok_s", "max", "tok/s", "prefill tokens/s (higher is better)", short="prefill", fmt=".0f"),
    Metric("ttft_ms", "min", "ms", "time to first token (ms)"),
    Metric("token_latency_p50_ms", "min", "ms", "per-token latency p50 (ms)"),
    Metric("token_latency_p90_ms", "min", "ms", "per-token latency p90 (ms)"),
    Metric("peak_rss_mb", "min", "MB", "peak memory (MB)"),
    Metric("size_mb", "min", "MB", "size on disk (MB)", short="size", fmt=".1f"),
    Metric("prefill_tok_s_cv", "min"), Metric("decode_tok_s_cv", "min"),
    Metric("foreign_cpus", "min", "CPUs", "other processes' load during the benchmark"),
    Metric("repeats_set_aside", "min"),
    Metric(r"(decode|prefill)_tok_s\.t[1-9][0-9]*", "max", "tok/s", pattern=True),
    Metric("decode_thread_speedup", "max"),
)
RAW = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "token_latency_p50_ms", "token_latency_p90_ms", "peak_rss_mb",
       "prefill_tok_s_cv", "decode_tok_s_cv", "foreign_cpus", "repeats_set_aside")


class BenchSpec(Strict):
    threads: int | list[int] | None = Field(
        None, description="Threads; default: every CPU of the node. A list (e.g. [1, 2]) measures each, in its "
        "own process, for the thread scaling (decode_tok_s.t<N>, decode_thread_speedup); the largest count is "
        "the cell's headline figure.")
    pinning: Literal["compact", "spread", "none"] = Field(
        "compact", description="Which cores a benchmark's threads are pinned to: 'compact' neighbouring cores "
        "(shared caches), 'spread' one per physical core round-robin over sockets, 'none' no pinning.")
    reuse: Literal["always", "same_kind", "same_host", "never"] = Field(
        "same_kind", description="When a resubmitted sweep reuses an earlier benchmark (single-stream, roofline "
        "and serve) of the same cell and target: 'same_kind' only if it was measured on a machine of the same kind "
        "(CPU model, family, ISA, CPUs, memory, NUMA nodes, node labels but farm/node, library versions), "
        "wherever its host name (an autoscaled node replacing another); 'same_host' only on this very machine; "
        "'always' wherever it was measured; 'never' (measure again in every job). A front then never mixes "
        "kinds of machine silently; each cell records when and where it was measured.")
    prompt_tokens: int = Field(128, ge=8, le=8192)
    decode_tokens: int = Field(64, ge=4, le=4096)
    warmup: int = Field(1, ge=0, le=20)
    repeats: int = Field(3, ge=1, le=100)

    @field_validator("threads")
    @classmethod
    def _threads(cls, v):
        levels = v if isinstance(v, list) else [] if v is None else [v]
        if isinstance(v, list) and not v:
            raise ValueError("a thread list needs at least one count, e.g. [1, 2]")
        if any(t < 1 or t > 1024 for t in levels):
            raise ValueError(f"each thread count must be between 1 and 1024; got {v}")
        if isinstance(v, list) and sorted(set(v)) != v:
            raise ValueError(f"thread counts must be distinct and increasing, e.g. [1, 2, 4]; got {v}")
        return v

    def levels(self, cpus: int) -> list[int]:
        """The thread counts to measure on a node of `cpus` CPUs (the default: all of them)."""
        return list(self.threads) if isinstance(self.threads, list) else [self.threads or cpus]


Config = BenchSpec  # the section's model, as every stage kind names it


def params(ctx: dict) -> dict:
    return {"bench": ctx["sweep"].bench.model_dump(), "target": ctx["target"], "runtime": ctx["runtime"]}


def code(params: dict) -> list[str]:
    return ["farm.measure.speed", runtime_module(params["runtime"])]


def run(stage, deps: list[dict], out: Path) -> dict:
    """One benchmark per thread count (bench.threads), each in its own process; the largest is the cell's."""
    from farm.measure import speed

    export, reference = deps
    spec = stage.params["bench"]
    levels = BenchSpec.model_validate(spec).levels(threads_here())
    runtime = stage.params["runtime"]
    raws = {}
    for t in levels:
        raws[t] = speed.run(runtime, Path(export["artifact"]), Path(reference["reference_dir"]), spec, t,
                            out / f"bench-t{t}.json", describe(export, runtime))
    threads = levels[-1]
    raw = raws[threads]
    metrics = {k: raw[k] for k in RAW}
    metrics["size_mb"] = export["size_mb"]
    if len(levels) > 1:
        for t, r in raws.items():
            metrics[f"decode_tok_s.t{t}"], metrics[f"prefill_tok_s.t{t}"] = r["decode_tok_s"], r["prefill_tok_s"]
        metrics["decode_thread_speedup"] = raw["decode_tok_s"] / raws[levels[0]]["decode_tok_s"]
    (out / "bench.json").write_text(json.dumps({**raw, "levels": {str(t): r for t, r in raws.items()}}))
    for t in levels:
        (out / f"bench-t{t}.json").unlink()
    return {"metrics": metrics, "contaminated": any(r["contaminated"] for r in raws.values()), "threads": threads,
            "thread_levels": levels, "pinning": raw.get("pinning", "compact"), "measured_at": raw.get("measured_at"),
            "runtime_settings": raw.get("runtime_settings", {}), "bench_json": "bench.json"}


def reuse(stage) -> str:
    return stage.params["bench"].get("reuse", "same_kind")


def stands(result: dict) -> bool:
    """A benchmark disturbed by other load (contaminated) is never reused: the next job measures it again, so that
    the cell can re-qualify on that machine."""
    return not result.get("contaminated")


def record(result: dict, label: str) -> dict:
    """What the cell's run gets from its benchmark: where and when it ran, under what load, with which library
    versions and runtime settings (tags), and the raw repeats (bench.json) the medians come from."""
    host = result.get("host", {})
    # the labels of the Ray node it ran on (those the label selector matched); else this machine's
    labels = result.get("node_labels") or (nodes.labels(host) if host else {})
    tags = {f"farm.node.{k}": v for k, v in labels.items()}
    tags.update({"farm.cpu_model": host.get("model_name", ""), "farm.isa": host.get("isa", ""),
                 "farm.hostname": host.get("hostname", ""), "farm.node_id": result.get("node_id", ""),
                 "farm.bench.contaminated": str(result.get("contaminated")).lower(),
                 "farm.bench.threads": str(result.get("threads")),
                 "farm.bench.pinning": str(result.get("pinning", "compact")),
                 "farm.bench.stage": str(result.get("stage", ""))})
    if len(result.get("thread_levels") or []) > 1:
        tags["farm.bench.thread_levels"] = ",".join(map(str, result["thread_levels"]))
    if result.get("measured_at"):  # when, beside where (farm.hostname) and under what load (foreign_cpus)
        tags["farm.bench.measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result["measured_at"]))
    tags.update({f"farm.version.{k}": v for k, v in result.get("versions", {}).items()})
    tags.update({f"farm.runtime.{k}": v for k, v in result.get("runtime_settings", {}).items()})
    files = {}
    raw = raw_json(result)
    if raw is not None:
        files["bench.json"] = raw.read_text()
    else:  # the raw repeats are what the medians come from: a run without them says so
        tags["farm.bench.raw_missing"] = "true"
        print(f"farm: WARNING: {label}: the benchmark's raw bench.json is gone from storage; its run is flagged "
              "farm.bench.raw_missing=true", flush=True)
    return {"tags": tags, "files": files}


def raw_json(result: dict) -> Path | None:
    """The raw benchmark file; with a remote store it may live on another node's cache: fetch it."""
    if not result.get("bench_json"):
        return None
    path = Path(result["bench_json"])
    if not path.is_file() and storage.url():
        path = storage.fetch(result["stage"], (result.get("pins") or {}).get(result["stage"])) / "bench.json"
    return path if path.is_file() else None
