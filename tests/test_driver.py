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
