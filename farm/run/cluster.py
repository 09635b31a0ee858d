"""Where stages run: the sweep's targets against the cluster's nodes (label selectors, Ray's semantics), the
autoscaler asked for a benchmark node a target lacks, the Ray options of each stage (a benchmark owns its node),
and benchmarks whose target lost every node."""

from __future__ import annotations

import os
import time
from pathlib import Path

import ray

from farm.errors import SpecError, StageError
from farm.stages.common import declared

BENCH_SLOT = "bench_slot"


def exclusive(kind: str) -> bool:
    """A stage of this kind owns a whole node of its target while it runs (farm/stages/<kind>.py: EXCLUSIVE)."""
    return bool(declared(kind, "EXCLUSIVE"))


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray's label_selector semantics: 'v', '!v', 'in(a,b)', '!in(a,b)'."""
    for key, want in selector.items():
        have = labels.get(key)
        negate = want.startswith("!")
        want = want[1:] if negate else want
        values = [v.strip() for v in want[3:-1].split(",")] if want.startswith("in(") and want.endswith(")") else [want]
        hit = have in values
        if hit == negate:
            return False
    return True


def node_types() -> dict[str, dict]:
    """The node types the cluster's autoscaler can start (available_node_types with max_workers > 0), from
    $FARM_AUTOSCALING_CONFIG, else ~/ray_bootstrap_config.yaml where `ray up` leaves the cluster config on
    the head; none on a fixed cluster."""
    import yaml

    path = Path(os.environ.get("FARM_AUTOSCALING_CONFIG") or "~/ray_bootstrap_config.yaml").expanduser()
    if not path.is_file():
        return {}
    types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types") or {}
    return {name: t for name, t in types.items() if int(t.get("max_workers", 0)) > 0}


def check_targets(sweep) -> dict[str, int]:
    """target name -> CPUs a benchmark there reserves (every CPU of each of its nodes); a target no node satisfies,
    or whose bench nodes differ in size (a benchmark would not own the larger ones), is a SpecError. A target
    only a node type of the autoscaler satisfies (min_workers: 0) is valid: its node is asked for and waited on.
    With an autoscaler, every target holds a standing request for one bench node until the job ends, so that
    idle bench nodes are not scaled away while the job compresses for hours."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    types = node_types()
    inventory = "\n".join(
        [f"      node {n['NodeID'][:12]}: {n.get('Labels', {})} resources {dict(n['Resources'])}" for n in nodes]
        + [f"      node type {k} (autoscaled): {t.get('labels', {})} resources {t.get('resources', {})}"
           for k, t in types.items()])
    problems, wanted, held = [], {}, {}
    for i, t in enumerate(sweep.targets):
        startable = [k for k, nt in types.items() if selector_matches(t.labels, nt.get("labels") or {})
                     and (nt.get("resources") or {}).get(BENCH_SLOT, 0) >= 1]
        sizes = {int(n["Resources"].get("CPU", 1)) for n in _bench_nodes(t.labels, nodes)}
        sizes |= {int(types[k]["resources"]["CPU"]) for k in startable if "CPU" in types[k]["resources"]}
        if len(sizes) > 1:
            problems.append(f"targets[{i}] '{t.name}': labels {t.labels} match bench nodes of different sizes "
                            f"({', '.join(map(str, sorted(sizes)))} CPUs); a benchmark owns a whole node, so give the "
                            f"target labels that pick one size (e.g. farm/cores); the cluster has:\n{inventory}")
        if startable:
            held[t.name] = (t.labels, startable)
        if _bench_nodes(t.labels, nodes):
            continue
        if startable:
            wanted[t.name] = (t.labels, startable)
        else:
            problems.append(f"targets[{i}] '{t.name}': no alive node with a {BENCH_SLOT}, and no node type the "
                            f"autoscaler can start, matches labels {t.labels}; the cluster has:\n{inventory}")
    if problems:
        raise SpecError(problems, "cluster")
    if held:
        hold_nodes(held)
    if wanted:
        scale_up(wanted)
        nodes = [n for n in ray.nodes() if n["Alive"]]
    return {t.name: int(min(n["Resources"].get("CPU", 1) for n in _bench_nodes(t.labels, nodes)))
            for t in sweep.targets}


def _bench_nodes(labels: dict, nodes: list[dict]) -> list[dict]:
    """The alive nodes of `nodes` with a bench slot whose labels satisfy `labels`."""
    return [n for n in nodes if n["Resources"].get(BENCH_SLOT, 0) >= 1 and selector_matches(labels, n.get("Labels", {}))]


SCALE_UP_WAIT_S = 900.0


def hold_nodes(held: dict[str, tuple[dict, list[str]]]) -> None:
    """Ask the autoscaler for one benchmark node per target (a bench slot under the target's labels), whether one
    is up or not: the request stands for the rest of the job, so an idle bench node is neither scaled away before
    its benchmarks are scheduled nor left unreplaced when it is lost; the next job's request (or `release_nodes`)
    replaces it."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{BENCH_SLOT: 1} for _ in held],
                      bundle_label_selectors=[dict(labels) for labels, _ in held.values()])


def scale_up(wanted: dict[str, tuple[dict, list[str]]]) -> None:
    """Wait until each target the autoscaler was asked a node for (hold_nodes) has one."""
    wait = float(os.environ.get("FARM_SCALE_UP_WAIT_S", SCALE_UP_WAIT_S))
    deadline, t0 = time.time() + wait, time.time()
    for name, (labels, types) in wanted.items():
        print(f"farm: target '{name}': no node is up yet; asked the autoscaler for one of type "
              f"{', '.join(types)} (labels {labels}), waiting up to {wait:.0f} s", flush=True)
    while missing := [name for name, (labels, _) in wanted.items()
                      if not _bench_nodes(labels, [n for n in ray.nodes() if n["Alive"]])]:
        if time.time() > deadline:
            raise StageError(f"the autoscaler started no node for target(s) {', '.join(missing)} within {wait:.0f} s "
                             "(FARM_SCALE_UP_WAIT_S); see `ray status` and the autoscaler's log "
                             "(/tmp/ray/session_latest/logs/monitor.*) for why — quota, instance type, max_workers")
        time.sleep(2)
    print(f"farm: autoscaled node(s) up for {', '.join(wanted)} after {time.time() - t0:.0f} s", flush=True)


def release_nodes() -> None:
    """Withdraw this job's standing request for benchmark nodes (the autoscaler may then scale them away)."""
    if node_types():
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])


def task_options(stage, bench_cpus: dict[str, int], model_bytes: int | None, trust_code: bool = False,
                 stage_memory: int | None = None, stage_cpus: int = 1) -> dict:
    """Stages of an EXCLUSIVE kind (benchmarks): every CPU of a node that matches the target's labels, plus its
    bench slot. Other stages: the sweep's stage_cpus anywhere (Ray sets OMP_NUM_THREADS to it, and the stage runs
    that many threads), and its stage_memory_gb, else memory for ~3 copies of the float model (load, transform,
    save)."""
    name = f"{stage.kind}:{stage.id}"
    if trust_code:  # the sweep opted in to the model's own code: only its tasks get the permission
        return {**task_options(stage, bench_cpus, model_bytes, stage_memory=stage_memory, stage_cpus=stage_cpus),
                "runtime_env": {"env_vars": {"FARM_TRUST_REMOTE_CODE": "1"}}}
    if exclusive(stage.kind):  # measurements own their node
        target = stage.params["target"]
        opts = {"num_cpus": bench_cpus[target["name"]], "resources": {BENCH_SLOT: 1}, "name": name}
        if target["labels"]:
            opts["label_selector"] = dict(target["labels"])
        return opts
    opts = {"num_cpus": stage_cpus, "name": name}
    if stage_memory:
        opts["memory"] = stage_memory
    elif model_bytes:
        opts["memory"] = 3 * model_bytes + 2**30
    return opts


def check_fits(asks: dict[tuple[float, float], str]) -> None:
    """Each (CPUs, memory bytes) a stage asks for, with what asks it, fits one node: an alive one, or a node type
    the autoscaler can start (its declared CPU and memory; undeclared counts as enough). Ray would otherwise keep
    such a stage pending for ever; this refuses the sweep before anything runs."""
    sizes = [(n["Resources"].get("CPU", 0), n["Resources"].get("memory", 0)) for n in ray.nodes() if n["Alive"]]
    sizes += [((t.get("resources") or {}).get("CPU", float("inf")), (t.get("resources") or {}).get("memory", float("inf")))
              for t in node_types().values()]
    problems = [f"{who}: asks for {cpus:g} CPU(s) and {memory / 2**30:.1f} GiB of memory, which no node has (the "
                f"largest: {max(c for c, _ in sizes):g} CPUs, {max(m for _, m in sizes) / 2**30:.1f} GiB); lower "
                "stage_cpus / stage_memory_gb, or add a node that holds it"
                for (cpus, memory), who in asks.items() if not any(cpus <= c and memory <= m for c, m in sizes)]
    if problems:
        raise SpecError(problems, "cluster")


def strand(waiting: dict, stranded: dict) -> None:
    """Cancel the node-owning stages (benchmarks, and what reads them) whose target has lost every node it could
    run on (a node died): Ray would keep them pending forever. Every such stage of a cell is cancelled, not only
    the first. Tasks on a lost node that another node can run are retried by Ray."""
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get(BENCH_SLOT, 0) >= 1]
    for ref, cell in waiting.items():
        target = cell.spec["target"]
        if not any(selector_matches(target["labels"], n.get("Labels", {})) for n in nodes):
            stranded.setdefault(cell.id, f"target '{target['name']}' lost every node that matches {target['labels']}; "
                                         "its benchmark was cancelled")
            ray.cancel(ref)


def running_tasks(job_id: str, grid) -> dict[str, str] | None:
    """stage id -> node, for this job's RUNNING tasks (Ray's state API; None if it cannot answer in time)."""
    try:
        from ray.util.state import list_tasks

        tasks = list_tasks(filters=[("job_id", "=", job_id), ("state", "=", "RUNNING")], limit=1000,
                           raise_on_missing_output=False, timeout=10)
        names = {n["NodeID"]: n.get("Labels", {}).get("farm/node") or n["NodeManagerAddress"] for n in ray.nodes()}
    except Exception:  # noqa: BLE001 (progress is informative; the sweep goes on without it)
        return None
    out = {}
    for t in tasks:
        sid = (t.name or "").partition(":")[2]
        if sid in grid.stages:
            out[sid] = names.get(t.node_id, (t.node_id or "?")[:8])
    return out


def describe_nodes(address: str) -> str:
    """`farm nodes`: every alive node of the cluster with its labels and resources."""
    ray.init(address=address, log_to_driver=False)
    lines = []
    for n in ray.nodes():
        if n["Alive"]:
            labels = {k: v for k, v in n.get("Labels", {}).items() if k != "ray.io/node-id"}
            lines.append(f"node {n['NodeID'][:12]} {n['NodeManagerAddress']}\n  labels: {labels}\n"
                         f"  resources: {dict(n['Resources'])}")
    return "\n".join(lines)
