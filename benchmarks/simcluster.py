"""The farm at scale, simulated on one machine: many Ray nodes of three CPU kinds (bench-capable and build-only)
from `ray.cluster_utils.Cluster`, a sweep of N cells over them through the real driver, grid, storage, ledger and
a private MLflow server; only each stage's work is replaced ($FARM_STAGE_WORK = `work` below): it sleeps for a
duration scaled from the stage kind's time on the embedded model (per CPU kind for the node-owning measurements)
and returns deterministic synthetic results of the real shape. Nothing here measures a model: it measures the farm.

It reports, per sweep size: the driver's CPU seconds per stage (its process time: main loop, Ray's core worker
threads, MLflow writes), MLflow requests per cell by endpoint (from the server's access log), the makespan against
a lower bound of the ideal one (critical path, CPUs, bench nodes per target), and bench exclusivity from the
ledger (no other stage on a node while a node-owning stage ran there).

    .venv/bin/python benchmarks/simcluster.py --cells 250 1000 --out benchmarks/results/simcluster.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# simulated CPU kinds: the labels `farm labels` gives such a node, and how long a measurement there takes
# against the zen1 EPYC the base durations come from
KINDS = {
    "spr": ({"farm/cpu-vendor": "intel", "farm/cpu-family": "sapphirerapids", "farm/isa": "amx"}, 0.6),
    "zen4": ({"farm/cpu-vendor": "amd", "farm/cpu-family": "zen4", "farm/isa": "avx512"}, 0.8),
    "zen3": ({"farm/cpu-vendor": "amd", "farm/cpu-family": "zen3", "farm/isa": "avx2"}, 1.0),
}
# seconds a stage of each kind took on the embedded model on the zen1 EPYC (session 18's distill_reverse and
# movement sweeps: prune_mlp ~20 s, a GGUF export ~25 s, an evaluation ~15 s, a 3-repeat bench ~60 s, a roofline
# ~8 s); multiplied by --scale
SECONDS = {"base": 2, "reference": 20, "compress": 20, "export": 25, "evaluate": 15, "bench": 60, "roofline": 8,
           "tasks": 90, "serve": 120}
QUANTS = ["F16", "Q8_0", "Q4_K_M", "Q4_0"]


def unit(stage_id: str, salt: str) -> float:
    """A deterministic number in [0, 1) for a stage."""
    return int(hashlib.sha256(f"{stage_id}:{salt}".encode()).hexdigest()[:8], 16) / 2**32


def duration(stage, cpu_kind: str | None) -> float:
    """The simulated seconds of a stage: its kind's, +-20 % by its id, times the CPU kind's factor for the
    stages that measure a node (they run on their target's kind)."""
    from farm.run.cluster import exclusive

    factor = KINDS[cpu_kind][1] if cpu_kind and exclusive(stage.kind) else 1.0
    return SECONDS[stage.kind] * float(os.environ["FARM_SIM_SCALE"]) * factor * (0.8 + 0.4 * unit(stage.id, "t"))


def work(stage, deps: list[dict], out: Path) -> dict:
    """A stage's stand-in (farm/stages/runner.py: work): sleep, write the files its kind's paths name, return
    results of the real shape with synthetic, deterministic values."""
    import ray

    kind = ray.get_runtime_context().get_node_labels().get("farm/sim-kind")
    time.sleep(duration(stage, kind))
    u = unit(stage.id, "m")
    p = stage.params
    if stage.kind in ("base", "compress"):
        return {"model_dir": str(out)}
    if stage.kind == "reference":
        return {"reference_dir": "."}
    if stage.kind == "export":
        (out / "model.bin").write_bytes(b"sim")
        bits = {"F16": 16, "Q8_0": 8.5, "Q4_K_M": 4.8, "Q4_0": 4.5}.get(p.get("quant"), 16)
        return {**p, "artifact": "model.bin", "size_mb": 270.0 * bits / 16 * (0.5 + u / 2), "sha256": "sim"}
    if stage.kind == "evaluate":
        return {"metrics": {"perplexity": 16.5 * (1 + 3 * u), "kl_div": u, "top1_agree": 1 - u / 2}}
    if stage.kind == "bench":
        speed = 30.0 / KINDS[kind][1] * (0.5 + u)
        (out / "bench.json").write_text(json.dumps({"decode_tok_s": speed}))
        metrics = {"decode_tok_s": speed, "prefill_tok_s": 8 * speed, "ttft_ms": 1000 / speed, "size_mb": 100.0,
                   "token_latency_p50_ms": 1000 / speed, "token_latency_p90_ms": 1100 / speed,
                   "peak_rss_mb": 400.0, "prefill_tok_s_cv": 0.01, "decode_tok_s_cv": 0.01, "foreign_cpus": 0.0,
                   "repeats_set_aside": 0.0}
        return {"metrics": metrics, "contaminated": False, "threads": 2, "thread_levels": [2], "pinning": "compact",
                "measured_at": time.time(), "runtime_settings": {}, "bench_json": "bench.json"}
    if stage.kind == "roofline":
        (out / "roofline.json").write_text("{}")
        return {"metrics": {"mem_bandwidth_gbs": 20.0, "roofline_efficiency": 0.5 + u / 2},
                "roofline_json": "roofline.json"}
    raise NotImplementedError(f"the simulation has no stand-in for stage kind {stage.kind}")


def sweep_yaml(cells: int, name: str) -> str:
    """A sweep of about `cells` cells: the base and prune_mlp at evenly spaced ratios, four GGUF levels, one
    target per CPU kind."""
    pipelines = max(1, round(cells / (len(QUANTS) * len(KINDS))) - 1)
    ratios = [round(0.05 + 0.85 * i / max(1, pipelines - 1), 4) for i in range(pipelines)]
    targets = "\n".join(f"  - name: {k}\n    labels: {{farm/sim-kind: {k}}}" for k in KINDS)
    return (f"name: {name}\ndata: {{calib_tokens: 4096, eval_windows: 4, eval_window_tokens: 256}}\n"
            f"pipelines:\n  - []\n  - [{{method: prune_mlp, ratio: {json.dumps(ratios)}}}]\n"
            f"exports:\n  - format: gguf\n    quant: {json.dumps(QUANTS)}\ntargets:\n{targets}\n"
            "objectives: {perplexity: min, decode_tok_s: max, size_mb: min}\n")


def ideal(grid, nodes: dict[str, dict], total_cpus: int) -> dict:
    """Lower bounds of the makespan for the simulated durations: the critical path, all work over all CPUs
    (a node-owning stage holds every CPU of its node), and each target's node-owning work over its bench nodes."""
    from farm.run.cluster import exclusive

    finish: dict[str, float] = {}
    cpu_s, per_target = 0.0, {}
    cpus = {k: n["cpus"] for k, n in nodes.items()}
    for sid, st in grid.stages.items():  # topological order
        kind = st.params["target"]["name"] if exclusive(st.kind) else None
        d = duration(st, kind)
        finish[sid] = d + max((finish[x] for x in st.deps), default=0.0)
        if kind:
            per_target[kind] = per_target.get(kind, 0.0) + d
            cpu_s += d * cpus[kind]
        else:
            cpu_s += d
    bounds = {"critical_path_s": max(finish.values()), "cpu_bound_s": cpu_s / total_cpus,
              **{f"bench_bound_{k}_s": s / nodes[k]["count"] for k, s in per_target.items()}}
    return {**{k: round(v, 2) for k, v in bounds.items()}, "ideal_s": round(max(bounds.values()), 2)}


def mlflow_requests(log: Path, cells: int) -> dict:
    """Requests the MLflow server answered, by endpoint (from uvicorn's access log), and per cell."""
    counts: dict[str, int] = {}
    for m in re.finditer(r'"(GET|POST|PUT|DELETE|PATCH) (/[^ ?"]*)', log.read_text(errors="replace")):
        path = m.group(2)
        path = re.sub(r"/mlflow-artifacts/artifacts/.*", "/mlflow-artifacts/artifacts/<file>", path)
        counts[f"{m.group(1)} {path}"] = counts.get(f"{m.group(1)} {path}", 0) + 1
    total = sum(counts.values())
    return {"total": total, "per_cell": round(total / cells, 2), "by_endpoint": dict(sorted(counts.items(),
                                                                                            key=lambda kv: -kv[1]))}


def exclusivity(entries: list[dict], grid) -> dict:
    """From the ledger: node-owning stages (bench, roofline) during which another stage ran on the same node, and
    those that ran on a node of another CPU kind than their target's."""
    from farm.run.cluster import exclusive

    by_node: dict[str, list[dict]] = {}
    for e in entries:
        by_node.setdefault(e["node_labels"].get("farm/node", "?"), []).append(e)
    owning, shared, elsewhere = 0, [], []
    for node, runs in by_node.items():
        for e in runs:
            if not exclusive(e["kind"]):
                continue
            owning += 1
            if any(o is not e and o["started"] < e["ended"] and e["started"] < o["ended"] for o in runs):
                shared.append(f"{e['stage']} on {node}")
            stage = grid.stages[e["stage"].split("@")[0].split("-", 1)[1]]
            if stage.params["target"]["name"] != e["node_labels"].get("farm/sim-kind"):
                elsewhere.append(f"{e['stage']} on {node}")
    return {"node_owning_stages": owning, "shared_with_another_stage": len(shared),
            "on_another_cpu_kind": len(elsewhere), "examples": (shared + elsewhere)[:5]}


def timed(owner, name: str, spent: dict) -> None:
    """Wrap owner.name so that its CPU and wall seconds in this process add up in spent[name]."""
    fn = getattr(owner, name)

    def wrapper(*a, **k):
        c0, t0 = time.process_time(), time.time()
        try:
            return fn(*a, **k)
        finally:
            cpu, wall = spent.get(name, (0.0, 0.0))
            spent[name] = (cpu + time.process_time() - c0, wall + time.time() - t0)

    setattr(owner, name, wrapper)


def overhead(entries: list[dict], grid) -> dict:
    """Seconds each stage held its worker beyond its simulated work (the runner's own cost: storage, the node's
    facts, the ledger), from the ledger; and the gap between the first stage's start and the last one's end."""
    from farm.run.cluster import exclusive

    extra = []
    for e in entries:
        stage = grid.stages[e["stage"].split("@")[0].split("-", 1)[1]]
        kind = e["node_labels"].get("farm/sim-kind") if exclusive(stage.kind) else None
        extra.append(e["ended"] - e["started"] - duration(stage, kind))
    extra.sort()
    span = max(e["ended"] for e in entries) - min(e["started"] for e in entries)
    return {"runner_overhead_mean_s": round(sum(extra) / len(extra), 3),
            "runner_overhead_p90_s": round(extra[int(0.9 * (len(extra) - 1))], 3), "stages_span_s": round(span, 1)}


def free_port() -> int:
    """A free port outside the simulated nodes' worker ports."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            if not 30000 <= (port := s.getsockname()[1]) <= 30999:
                return port


def start_mlflow(home: Path, workers: int) -> tuple[subprocess.Popen, str, Path]:
    import urllib.request

    port, log = free_port(), home / "mlflow.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers), "--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--serve-artifacts",
         "--artifacts-destination", str(home / "artifacts")],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return proc, uri, log
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"the simulation's MLflow server did not start; see {log}")


def start_cluster(bench_nodes: int, build_nodes: int, cpus: int, temp_dir: Path):
    """A head (build-only) and, per CPU kind, `bench_nodes` bench-capable nodes and `build_nodes` build-only
    ones, each with `cpus` logical CPUs and a label naming it (farm/node) and its kind (farm/sim-kind)."""
    from ray.cluster_utils import Cluster

    # its own temp dir and worker ports (not those of a farm cluster on this machine); the nodes listen on the
    # machine's address, as the e2e tests' multi-raylet cluster does: Ray binds loopback only in its
    # single-machine mode, which refuses a second raylet
    common = {"num_cpus": cpus, "object_store_memory": 80 * 2**20, "memory": 64 * 2**30,
              "min_worker_port": 30000, "max_worker_port": 30999}
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, "include_dashboard": False, "dashboard_port": free_port(), "temp_dir": str(temp_dir),
        "labels": {"farm/node": "head"}})
    nodes = {}
    for kind, (labels, _) in KINDS.items():
        for i in range(bench_nodes + build_nodes):
            bench = i < bench_nodes
            cluster.add_node(**common, resources={"bench_slot": 1} if bench else {},
                             labels={**labels, "farm/sim-kind": kind, "farm/node": f"{kind}-{i}"})
        nodes[kind] = {"cpus": cpus, "count": bench_nodes}
    cluster.wait_for_nodes()
    total = cpus * (1 + len(KINDS) * (bench_nodes + build_nodes))
    return cluster, nodes, total


def one(cells: int, scale: float, bench_nodes: int, build_nodes: int, cpus: int, workers: int) -> dict:
    """One simulated sweep in this process (the driver's process time is this process's)."""
    import ray

    home = Path(tempfile.mkdtemp(prefix="fsim-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    # RAY_TMPDIR: Ray's temp dir, and the address file `ray.init(address="auto")` reads, are the simulation's own:
    # a farm cluster on this machine keeps its own (Cluster() would otherwise overwrite it, then delete it)
    os.environ.update({"RAY_TMPDIR": str(home), "FARM_HOME": str(home), "FARM_STAGE_WORK": "benchmarks.simcluster:work",
                       "FARM_SIM_SCALE": str(scale), "FARM_PROGRESS_S": "60",
                       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    token = home / "auth_token"  # token authentication on, as on the farm's clusters, with the simulation's own token
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    mlflow_proc, uri, mlflow_log = start_mlflow(home, workers)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cluster, nodes, total_cpus = start_cluster(bench_nodes, build_nodes, cpus, home / "ray")
    try:
        from farm.plan import grid as gridmod
        from farm.run import driver
        from farm.stages import runner
        from farm.sweep import spec

        from farm.decide import report

        path = home / "sweep.yaml"
        path.write_text(sweep_yaml(cells, f"sim{cells}"))
        t_grid = time.process_time()
        grid = gridmod.build(spec.load(path))
        t_grid = time.process_time() - t_grid
        spent: dict[str, tuple[float, float]] = {}  # the driver's parts: CPU and wall seconds
        for owner, name in ((driver, "submit"), (driver.Job, "sweep_phase"), (driver.Job, "later_phases"),
                            (report, "pareto_report"), (driver, "write_report")):
            timed(owner, name, spent)
        bound = ideal(grid, nodes, total_cpus)
        ray.init(address=cluster.address, log_to_driver=False)
        out = home / "driver.log"
        t0, c0 = time.time(), time.process_time()
        stdout, sys.stdout = sys.stdout, out.open("w", buffering=1)
        try:
            code = driver.run(str(path))
        finally:
            sys.stdout.close()
            sys.stdout = stdout
        wall, cpu = time.time() - t0, time.process_time() - c0
        requests = mlflow_requests(mlflow_log, len(grid.cells))  # before the check below reads MLflow
        from farm.record import queries

        _, _, parent = queries.latest_sweep_run(f"sim{cells}")
        runs = queries.cell_runs(parent)
        entries = runner.ledger()
        result = {
            "cells": len(grid.cells), "stages": len(grid.stages), "nodes": 1 + len(KINDS) * (bench_nodes + build_nodes),
            "bench_nodes_per_kind": bench_nodes, "cpus_per_node": cpus, "mlflow_workers": workers, "scale": scale,
            "exit_code": code, "driver_cpu_s": round(cpu, 2),
            "driver_cpu_ms_per_stage": round(1000 * cpu / len(grid.stages), 2),
            "loop_cpu_ms_per_stage": round(1000 * spent["sweep_phase"][0] / len(grid.stages), 3),
            "validate_and_grid_cpu_s": round(t_grid, 2),
            "parts": {k: {"cpu_s": round(c, 2), "wall_s": round(w, 1)} for k, (c, w) in spent.items()},
            "makespan_s": round(wall, 1), **bound, "makespan_over_ideal": round(wall / bound["ideal_s"], 3),
            "mlflow": requests,
            "cell_runs": len(runs), "cell_runs_distinct": len({r.data.tags.get("farm.cell_id") for r in runs}),
            "stages_run": len(entries), "reruns_after_publishing": len(runner.reruns(entries)),
            "exclusivity": exclusivity(entries, grid), **overhead(entries, grid),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
        os.killpg(mlflow_proc.pid, signal.SIGTERM)  # the server and its uvicorn workers
        mlflow_proc.wait(timeout=60)
        if not os.environ.get("FARM_SIM_KEEP"):  # FARM_SIM_KEEP=1: keep storage, ledger, logs and the database
            shutil.rmtree(home, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[250])
    ap.add_argument("--scale", type=float, default=0.02, help="simulated seconds per measured second")
    ap.add_argument("--bench-nodes", type=int, default=3, help="bench-capable nodes per CPU kind")
    ap.add_argument("--build-nodes", type=int, default=1, help="build-only nodes per CPU kind")
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs of each simulated node")
    ap.add_argument("--mlflow-workers", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # a child: one size, its JSON on the last line; stopped, it still takes its cluster down
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        print(json.dumps(one(a.cells[0], a.scale, a.bench_nodes, a.build_nodes, a.cpus, a.mlflow_workers)))
        return
    results = []
    for n in a.cells:  # each size in a fresh process: its driver's CPU time is its own
        cmd = [sys.executable, __file__, "--one", "--cells", str(n), "--scale", str(a.scale), "--bench-nodes",
               str(a.bench_nodes), "--build-nodes", str(a.build_nodes), "--cpus", str(a.cpus),
               "--mlflow-workers", str(a.mlflow_workers)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode:
            sys.exit(f"the {n}-cell simulation failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{r['cells']} cells, {r['stages']} stages: driver {r['driver_cpu_ms_per_stage']} ms CPU/stage "
              f"(main loop {r['loop_cpu_ms_per_stage']}), "
              f"MLflow {r['mlflow']['per_cell']} requests/cell, makespan {r['makespan_s']} s = "
              f"{r['makespan_over_ideal']} x ideal, reruns {r['reruns_after_publishing']}, bench shared "
              f"{r['exclusivity']['shared_with_another_stage']}", flush=True)
    if a.out:
        a.out.write_text(json.dumps({"cpu": cpu_name(), "command": " ".join(sys.argv), "results": results}, indent=1))
        a.out.with_suffix(".md").write_text(table(results, cpu_name(), " ".join(sys.argv)))


def table(results: list[dict], cpu: str, command: str) -> str:
    """The results as a Markdown table (benchmarks/results/simcluster-*.md is written by --out)."""
    rows = ["| cells | stages | driver CPU ms/stage (all) | main loop ms/stage | MLflow requests/cell | makespan s "
            "| ideal s | runner overhead s/stage | cells logged once | reruns | node-owning stages shared |",
            "|" + " --- |" * 11]
    for r in results:
        rows.append(f"| {r['cells']} | {r['stages']} | {r['driver_cpu_ms_per_stage']} | {r['loop_cpu_ms_per_stage']} "
                    f"| {r['mlflow']['per_cell']} | {r['makespan_s']} | {r['ideal_s']} | {r['runner_overhead_mean_s']} "
                    f"| {r['cell_runs_distinct']} of {r['cells']} | {r['reruns_after_publishing']} "
                    f"| {r['exclusivity']['shared_with_another_stage']} of {r['exclusivity']['node_owning_stages']} |")
    return f"CPU: {cpu}. Command: `{command}`.\n\n" + "\n".join(rows) + "\n"


def cpu_name() -> str:
    from farm import nodes

    f = nodes.facts()
    return f"{f['model_name']} ({f['family']}, {f['isa']}), {f['logical_cpus']} logical CPUs"


if __name__ == "__main__":
    main()
