from farm.plan.grid import Stage
from farm.run.cluster import selector_matches, task_options

LABELS = {"farm/isa": "amx", "farm/cpu-family": "sapphire-rapids", "farm/node": "a"}


def test_label_selector_semantics():
    assert selector_matches({}, LABELS)
    assert selector_matches({"farm/isa": "amx"}, LABELS)
    assert not selector_matches({"farm/isa": "avx2"}, LABELS)
    assert selector_matches({"farm/isa": "!avx2"}, LABELS) and not selector_matches({"farm/isa": "!amx"}, LABELS)
    assert selector_matches({"farm/cpu-family": "in(icelake,sapphire-rapids)"}, LABELS)
    assert not selector_matches({"farm/cpu-family": "!in(icelake,sapphire-rapids)"}, LABELS)
    assert not selector_matches({"farm/missing": "x"}, LABELS)


def test_benchmarks_take_a_whole_node_and_others_a_memory_request():
    bench = Stage("b1", "bench", {"target": {"name": "t", "labels": {"farm/isa": "amx"}}}, ())
    opts = task_options(bench, {"t": 8}, 10**9)
    assert opts["num_cpus"] == 8 and opts["resources"] == {"bench_slot": 1}
    assert opts["label_selector"] == {"farm/isa": "amx"} and "memory" not in opts
    export = Stage("e1", "export", {"format": "gguf", "quant": "F16"}, ())
    opts = task_options(export, {"t": 8}, 10**9)
    assert opts["num_cpus"] == 1 and opts["memory"] == 3 * 10**9 + 2**30
    assert "memory" not in task_options(export, {}, None)
    # the sweep's stage_memory_gb replaces the estimate (and the memory guard enforces it)
    assert task_options(export, {"t": 8}, 10**9, stage_memory=5 * 2**30)["memory"] == 5 * 2**30
    assert "memory" not in task_options(bench, {"t": 8}, 10**9, stage_memory=5 * 2**30)


def test_remote_code_permission_only_when_the_sweep_opts_in():
    export = Stage("e1", "export", {"format": "gguf", "quant": "F16"}, ())
    assert "runtime_env" not in task_options(export, {}, None)
    opts = task_options(export, {}, None, trust_code=True)
    assert opts["runtime_env"] == {"env_vars": {"FARM_TRUST_REMOTE_CODE": "1"}} and opts["num_cpus"] == 1


class _Ref:
    """An ObjectRef stand-in: its future, and how often the driver asked for it."""

    def __init__(self):
        import concurrent.futures

        self.fut, self.asked = concurrent.futures.Future(), 0

    def future(self):
        self.asked += 1
        return self.fut


def test_the_driver_loop_takes_each_completion_once_without_rescanning_what_is_pending():
    import threading

    from farm.errors import StageError
    from farm.run.driver import Job
    from farm.run.progress import Progress

    class Grid:
        stages, cells = {}, []

    n = 3000
    job = Job.__new__(Job)  # no Ray: the loop alone
    job.refs = {f"s{i}": _Ref() for i in range(n)}
    job.outcome, job.every = {}, 3600.0
    seen, ticks = [], []

    def finish():  # results arrive in an order of their own while most stages are still pending
        for i in reversed(range(n)):
            ref = job.refs[f"s{i}"]
            if i == 7:
                ref.fut.set_exception(StageError("stage s7 broke"))
            else:
                ref.fut.set_result({"metrics": {"x": i}, "seconds": 1.0})

    threading.Timer(0.2, finish).start()
    job.wait(list(job.refs), Progress(Grid()), seen.append, lambda: ticks.append(1))
    assert sorted(seen) == sorted(job.refs) and len(seen) == n  # each stage handed on exactly once
    assert all(ref.asked == 1 for ref in job.refs.values())  # registered once, never polled again
    assert job.outcome["s3"] == ({"metrics": {"x": 3}, "seconds": 1.0}, None)
    result, error = job.outcome["s7"]
    assert result is None and isinstance(error, StageError) and "s7 broke" in str(error)
    assert ticks  # tick() still runs as results arrive


def test_a_stage_no_node_can_hold_is_refused_before_anything_runs(monkeypatch):
    import pytest

    from farm.errors import SpecError
    from farm.run import cluster

    node = {"Alive": True, "Resources": {"CPU": 4.0, "memory": 16 * 2**30}}
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [node, {"Alive": False, "Resources": {"CPU": 64.0, "memory": 2**40}}])
    monkeypatch.setattr(cluster, "node_types", lambda: {})
    cluster.check_fits({(1, 15 * 2**30): "stage compress", (4, 2**30): "stage export"})  # fits the node
    with pytest.raises(SpecError) as e:  # a dead node's size does not count
        cluster.check_fits({(1, 20 * 2**30): "stage compress (stage_memory_gb)"})
    assert "stage compress (stage_memory_gb)" in str(e.value) and "20.0 GiB" in str(e.value)
    assert "largest: 4 CPUs, 16.0 GiB" in str(e.value)
    with pytest.raises(SpecError, match="5 CPU"):
        cluster.check_fits({(5, 2**30): "stage export"})
    # a node type the autoscaler can start that holds it makes it feasible
    monkeypatch.setattr(cluster, "node_types", lambda: {"big": {"resources": {"CPU": 8, "memory": 64 * 2**30}}})
    cluster.check_fits({(5, 20 * 2**30): "stage compress"})


def _bench_node(cpus, **labels):
    return {"Alive": True, "NodeID": f"n{cpus}{len(labels)}", "Labels": labels,
            "Resources": {"CPU": float(cpus), "bench_slot": 1.0, "memory": 2**34}}


def test_a_target_over_bench_nodes_of_two_sizes_is_refused(monkeypatch):
    from types import SimpleNamespace as NS

    import pytest

    from farm.errors import SpecError
    from farm.run import cluster

    monkeypatch.setattr(cluster, "node_types", lambda: {})
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [_bench_node(8, **{"farm/isa": "amx", "farm/cores": "8"}),
                                                       _bench_node(4, **{"farm/isa": "amx", "farm/cores": "4"})])
    with pytest.raises(SpecError) as e:  # a bench of 4 CPUs would share the 8-CPU node with other stages
        cluster.check_targets(NS(targets=[NS(name="amx", labels={"farm/isa": "amx"})]))
    assert "targets[0] 'amx'" in str(e.value) and "4, 8 CPUs" in str(e.value) and "farm/cores" in str(e.value)
    one_size = NS(targets=[NS(name="amx8", labels={"farm/isa": "amx", "farm/cores": "8"})])
    assert cluster.check_targets(one_size) == {"amx8": 8}


def test_with_an_autoscaler_every_target_holds_its_bench_node_for_the_job(monkeypatch):
    from types import SimpleNamespace as NS

    import ray.autoscaler.sdk

    from farm.run import cluster

    asked = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda **k: asked.append(k))
    types = {"spr": {"labels": {"farm/isa": "amx"}, "resources": {"CPU": 8, "bench_slot": 1}, "max_workers": 2}}
    monkeypatch.setattr(cluster, "node_types", lambda: types)
    monkeypatch.setattr(cluster.ray, "nodes", lambda: [_bench_node(8, **{"farm/isa": "amx"})])
    # its node is up: no waiting, but a standing request, so that the idle node is not scaled away mid-job
    assert cluster.check_targets(NS(targets=[NS(name="amx", labels={"farm/isa": "amx"})])) == {"amx": 8}
    assert asked == [{"bundles": [{"bench_slot": 1}], "bundle_label_selectors": [{"farm/isa": "amx"}]}]
