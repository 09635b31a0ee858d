"""Run one stage of the grid: base -> reference -> compress -> export -> evaluate / bench (-> serve).

`run_stage(stage, deps)` is plain Python: tests call it inline, the driver calls it inside a Ray task.
Each stage writes into its own directory in storage (published atomically) and returns a small dict,
never model weights; a stage whose result.json already exists is not run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from farm import nodes, storage
from farm.grid import Stage, library_versions

# recorded with every stage result and logged as tags (farm.version.*)
LIBRARIES = ("farm", "torch", "transformers", "llama-cpp-python", "ray", "mlflow", "numpy")


def threads_here() -> int:
    """CPUs this process may use (Ray sets OMP_NUM_THREADS to a task's num_cpus)."""
    return int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))


def _model_dir(dep: dict) -> Path:
    return Path(dep["model_dir"])


def run_base(stage: Stage, deps: list[dict], out: Path) -> dict:
    import shutil

    from farm.models import resolve

    model_dir = resolve(stage.params["model"], stage.params.get("revision"))
    if storage.url():  # other nodes may lack the model (a local path, this node's hub cache): it travels
        shutil.copytree(model_dir, out / "model")
        return {"model_dir": "model", "source": str(model_dir)}
    return {"model_dir": str(model_dir)}


def run_reference(stage: Stage, deps: list[dict], out: Path) -> dict:
    from farm.evaluate import build_reference

    info = build_reference(_model_dir(deps[0]), stage.params["data"], out, threads_here())
    return {**info, "reference_dir": "."}


def run_compress(stage: Stage, deps: list[dict], out: Path) -> dict:
    from farm.compress import run_method

    model, reference, *teacher = deps  # methods that learn from the base model get it third
    step = stage.params["step"]
    calib = np.load(Path(reference["reference_dir"]) / "calib_tokens.npy")
    (out / "model").mkdir()
    teacher_dir = _model_dir(teacher[0]) if teacher else None
    info = run_method(step["method"], _model_dir(model), step, calib, out / "model", threads_here(), teacher_dir)
    return {"model_dir": "model", "info": info}


def run_export(stage: Stage, deps: list[dict], out: Path) -> dict:
    params = stage.params
    fmt, src = params["format"], deps[0]
    if fmt == "torch" and params["quant"] == "fp32":  # the Hugging Face directory itself is the artifact
        artifact = _model_dir(src)  # recorded with its checksum like every artifact: promote verifies it
        return {**params, "artifact": str(artifact), "size_mb": storage.size_mb(artifact),
                "sha256": storage.sha256(artifact)}
    from farm.export import FORMATS

    source = Path(src["artifact"]) if "artifact" in src else _model_dir(src)
    calib = np.load(Path(deps[1]["reference_dir"]) / "calib_tokens.npy") if len(deps) > 1 else None
    path = FORMATS.get(fmt).export(source, params, out, threads_here(), calib)
    return {**params, "artifact": path.name, "size_mb": storage.size_mb(path), "sha256": storage.sha256(path)}


def describe(export: dict, runtime: dict) -> str:
    """'gguf Q8_0 on llamacpp (amx)': what a runtime was running, for messages."""
    from farm.runtimes import RUNTIMES

    return f"{export['format']} {export['quant']} on " + RUNTIMES.options(runtime["name"])(**runtime).describe()


def run_evaluate(stage: Stage, deps: list[dict], out: Path) -> dict:
    from farm.evaluate import evaluate_isolated

    export, reference = deps
    runtime = stage.params["runtime"]
    metrics = evaluate_isolated(runtime, Path(export["artifact"]), Path(reference["reference_dir"]),
                                threads_here(), out / "quality.json", describe(export, runtime))
    return {"metrics": metrics}


def run_tasks(stage: Stage, deps: list[dict], out: Path) -> dict:
    from farm.tasks import score_isolated

    export, base = deps
    runtime, tasks = stage.params["runtime"], stage.params["tasks"]
    result = score_isolated(runtime, Path(export["artifact"]), _model_dir(base), tasks["items"], tasks["seed"],
                            threads_here(), out / "tasks.json", describe(export, runtime), tasks.get("held_out", []),
                            tasks.get("chat", False))
    return {"metrics": result["metrics"], "items": result["items"], "cost": result["cost"]}


BENCH_METRICS = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "token_latency_p50_ms", "token_latency_p90_ms",
                 "peak_rss_mb", "prefill_tok_s_cv", "decode_tok_s_cv", "foreign_cpus", "repeats_set_aside")
ROOFLINE_METRICS = ("mem_bandwidth_gbs", "bytes_per_token_mb", "weight_mb_per_token", "roofline_decode_tok_s",
                    "roofline_efficiency")


def run_bench(stage: Stage, deps: list[dict], out: Path) -> dict:
    """One benchmark per thread count (bench.threads), each in its own process; the largest is the cell's."""
    from farm import bench
    from farm.spec import BenchSpec

    export, reference = deps
    spec = stage.params["bench"]
    levels = BenchSpec.model_validate(spec).levels(threads_here())
    runtime = stage.params["runtime"]
    raws = {}
    for t in levels:
        raws[t] = bench.run(runtime, Path(export["artifact"]), Path(reference["reference_dir"]), spec, t,
                            out / f"bench-t{t}.json", describe(export, runtime), fmt=export["format"])
    threads = levels[-1]
    raw = raws[threads]
    metrics = {k: raw[k] for k in BENCH_METRICS}
    metrics.update({k: raw["roofline"][k] for k in ROOFLINE_METRICS if k in raw.get("roofline", {})})
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


def run_serve(stage: Stage, deps: list[dict], out: Path) -> dict:
    from farm.serve import bench as servebench

    export, reference, base = deps
    spec = stage.params["serve"]
    threads = spec["threads"] or threads_here()
    from farm.evaluate import corpus_tokens

    _, corpus = corpus_tokens(Path(reference["reference_dir"]))  # the servers add a BOS themselves
    result = servebench.run(stage.params["runtime"], Path(export["artifact"]), _model_dir(base), corpus, spec,
                            threads, out / "engine")
    servebench.save(result, out / "serve.json")
    return {"serve": result, "serve_json": "serve.json"}


RUNNERS = {"base": run_base, "reference": run_reference, "compress": run_compress, "export": run_export,
           "evaluate": run_evaluate, "bench": run_bench, "tasks": run_tasks, "serve": run_serve}
PATH_KEYS = ("model_dir", "reference_dir", "artifact", "bench_json", "serve_json")


def _absolute(result: dict, final: Path) -> dict:
    """Paths a stage wrote inside its own directory are stored relative and resolved on read."""
    out = dict(result)
    for k in PATH_KEYS:
        if k in out and not os.path.isabs(out[k]):
            out[k] = str((final / out[k]).resolve())
    return out


def stored_result(name: str, pin: str | None = None) -> dict | None:
    """A finished stage's result as storage holds it, its paths on this node (fetched from a remote store,
    with `pin` only if its manifest has that sha256)."""
    result = storage.read_result(name, pin)
    return None if result is None else _absolute(result, storage.stage_dir(name))


def local(dep: dict) -> dict:
    """A dependency's result with its paths on this node (stages in a remote store are fetched first, each
    only if its manifest is the one the driver was told of: the dependency's pins)."""
    return {k: str(storage.here(v, dep.get("pins"))) if k in PATH_KEYS else v for k, v in dep.items()}


def storage_name(stage: Stage) -> str:
    """Where a stage's result is kept. A benchmark measures a machine at a time, so under the sweep's
    bench.reuse its name also carries the machine (same_host: host name, CPU model, cores, memory of the
    node running it now) or the Ray job (never): another machine, or another job, measures anew rather than
    reusing a figure from elsewhere. 'always' keeps the content id alone."""
    policy = stage.params["bench"].get("reuse", "same_host") if stage.kind == "bench" else "always"
    if policy == "always":
        return stage.name
    if policy == "same_host":
        f = nodes.facts()
        key = [f["hostname"], f["model_name"], f["logical_cpus"], f["memory_gb"], sorted(os.sched_getaffinity(0))]
    else:
        key = [_job_id()]
    return f"{stage.name}@{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:10]}"


def _job_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_job_id()
    except ImportError:
        pass
    return f"process-{os.getpid()}-{PROCESS_START}"


PROCESS_START = time.time()


def run_stage(stage: Stage, deps: list[dict], node: dict | None = None) -> dict:
    """Run a stage, or return its stored result. `node`: where it runs (recorded with the result)."""
    started = time.time()  # before the look-up: a run that finds nothing began before any other run's end
    name = storage_name(stage)
    final = storage.stage_dir(name)
    # the manifests of every stage this one reads from, as the driver holds them (a remote store only)
    pins = {k: v for d in deps for k, v in (d.get("pins") or {}).items()}
    cached = storage.read_result(name)
    if cached is not None:
        digest = storage.upload(name)  # a no-op unless a remote store missed it (a writer killed mid-upload)
        return {**_absolute(cached, final), "cached": True, **_pins(pins, name, digest)}
    deps = [local(d) for d in deps]
    t0 = time.time()
    with storage.publishing(final) as tmp:
        result = RUNNERS[stage.kind](stage, deps, tmp)
        # "stage": its name in storage (a benchmark's carries its machine)
        result.update({"stage": name, "kind": stage.kind, "params": stage.params, "seconds": time.time() - t0,
                       "host": nodes.facts(), "versions": library_versions(LIBRARIES), **(node or {})})
        (tmp / "result.json").write_text(json.dumps(result, indent=1, default=str))
    digest = storage.upload(name)
    _ledger(name, stage.kind, started, node)
    return {**_absolute(result, final), "cached": False, **_pins(pins, name, digest)}


def _ledger(name: str, kind: str, started: float, node: dict | None) -> None:
    """One line per stage this node actually ran (a reused result writes none) in $FARM_HOME/ledger.jsonl:
    what each node spent its time on, and the evidence that no stage is run again once it has finished —
    a run that starts after another run of the same stage ended would be one (`reruns`)."""
    line = {"stage": name, "kind": kind, "job": _job_id(), "host": os.uname().nodename, "pid": os.getpid(),
            "node_labels": (node or {}).get("node_labels", {}), "started": started, "ended": time.time()}
    path = _ledger_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:  # one short O_APPEND write: lines of concurrent stages stay whole
        f.write(json.dumps(line) + "\n")


def _ledger_path() -> Path:
    return storage.home() / "ledger.jsonl"


def ledger(since: float = 0.0) -> list[dict]:
    """The ledger's lines for runs that started at or after `since`."""
    path = _ledger_path()
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["started"] >= since]


def reruns(entries: list[dict]) -> list[tuple[dict, dict]]:
    """(an earlier run, a later one) of the same stage where the later one started after the earlier ended:
    work done again although its result was already stored. Runs that overlap (two sweeps reaching a shared
    stage at once, before either had published) are not reruns."""
    found = []
    by_stage: dict[str, list[dict]] = {}
    for e in entries:
        by_stage.setdefault(e["stage"], []).append(e)
    for runs in by_stage.values():
        first_end = min(runs, key=lambda e: e["ended"])
        found += [(first_end, e) for e in runs if e["started"] > first_end["ended"]]
    return found


def _pins(pins: dict, name: str, digest: str | None) -> dict:
    return {"pins": {**pins, name: digest}} if digest else {}
