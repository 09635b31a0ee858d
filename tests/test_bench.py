"""The benchmark's handling of other load on the machine, with a fake runtime and a fake /proc/stat."""

import numpy as np
import pytest

from farm.measure import cpuload
from farm.measure import speed as bench


class FakeRuntime:
    def prefill(self, tokens):
        return np.zeros(8)

    def step(self, token):
        return np.zeros(8)


@pytest.fixture
def machine(monkeypatch):
    """Each repeat reads /proc/stat twice; `load` lists the foreign CPU-seconds seen per repeat."""
    state = {"busy": 0.0, "calls": 0, "load": []}

    def busy():
        state["calls"] += 1
        if state["calls"] % 2 == 0:  # end of a repeat: add that repeat's foreign load
            i = state["calls"] // 2 - 1
            state["busy"] += state["load"][i] if i < len(state["load"]) else 0.0
        return state["busy"]

    monkeypatch.setattr(cpuload, "busy_seconds", busy)
    monkeypatch.setattr(cpuload, "own_cpu", lambda: 0.0)
    monkeypatch.setattr("farm.runtimes.load", lambda *a, **k: FakeRuntime())
    return state


def test_contaminated_repeats_are_set_aside_and_rerun(machine):
    machine["load"] = [0.0, 100.0, 0.0, 100.0, 0.0]  # warm-up, then dirty, clean, dirty, clean
    r = bench.measure("llamacpp", "x", [1, 2, 3], 4, warmup=1, repeats=2, threads=1)
    assert not r["contaminated"] and r["repeats_set_aside"] == 2 and len(r["raw"]["used"]) == 2
    assert r["foreign_cpus"] == 0.0


def test_persistent_load_is_flagged(machine):
    machine["load"] = [0.0] + [100.0] * 20
    r = bench.measure("llamacpp", "x", [1, 2, 3], 4, warmup=1, repeats=2, threads=1)
    assert r["contaminated"] and len(r["raw"]["used"]) == 2 and r["foreign_cpus"] > cpuload.CONTAMINATED_CPUS


def test_pinning_policies(monkeypatch):
    # two sockets of two cores with two hardware threads each: cpus 0-3 socket 0, 4-7 socket 1; cpu n and n+2
    # (n+4 and n+6) are siblings of one core
    topo = {c: (c // 4, c % 2) for c in range(8)}
    monkeypatch.setattr(bench, "_topology", lambda c: topo[c])
    cpus = list(range(8))
    assert bench.choose_cores(2, "compact", cpus) == [0, 1]
    assert bench.choose_cores(2, "spread", cpus) == [0, 4]  # one per socket
    assert bench.choose_cores(4, "spread", cpus) == [0, 1, 4, 5]  # physical cores before their siblings
    assert bench.choose_cores(2, "none", cpus) is None
    assert bench.choose_cores(16, "spread", cpus) == cpus


def test_thread_lists_are_validated():
    from farm.errors import SpecError
    from farm.stages.bench import Config as BenchSpec
    from farm.sweep.spec import parse

    assert BenchSpec(threads=[1, 2]).levels(8) == [1, 2] and BenchSpec().levels(8) == [8]
    assert BenchSpec(threads=4).levels(8) == [4]
    for bad, why in (([2, 1], "increasing"), ([], "at least one"), ([0, 2], "between 1 and 1024")):
        with pytest.raises(SpecError, match=why) as e:
            parse({"name": "x", "bench": {"threads": bad}})
        assert "bench.threads" in str(e.value)


def test_benchmarks_are_reused_only_where_the_reuse_policy_allows(monkeypatch):
    from farm import nodes
    from farm.plan.grid import Stage
    from farm.stages import runner as stages

    host = {"hostname": "a", "model_name": "AMD EPYC", "logical_cpus": 2, "memory_gb": 24}
    monkeypatch.setattr(nodes, "facts", lambda: dict(host))

    def name(policy, kind="bench", job=None):
        return stages.storage_name(Stage("abc", kind, {"bench": {"reuse": policy}}, ()), job)

    assert name("always") == "bench-abc" and name("same_host", kind="evaluate") == "bench-abc".replace("bench", "evaluate")
    here = name("same_host")
    assert here.startswith("bench-abc@") and name("same_host") == here  # the same machine finds its own
    host["model_name"] = "Intel Xeon"  # the same host name on another CPU (a VM moved) is another machine
    assert name("same_host") != here
    host["model_name"], host["hostname"] = "AMD EPYC", "b"
    assert name("same_host") != here
    # same_kind (the default): another host of the same kind reuses it; another CPU, other labels or other
    # library versions do not
    def kind_name(labels=None):
        return stages.storage_name(Stage("abc", "bench", {"bench": {}}, ()), None, labels)

    host.update(family="zen4", isa="avx512", numa_nodes=1)
    labels = {"farm/node": "a", "farm/isa": "avx512"}
    mine = kind_name(labels)
    host["hostname"] = "autoscaled-7"
    assert kind_name({**labels, "farm/node": "b"}) == mine  # a new host name and node name: the same kind
    assert kind_name({**labels, "farm/isa": "avx2"}) != mine
    host["model_name"] = "AMD EPYC 9R14"
    assert kind_name(labels) != mine
    host["model_name"] = "AMD EPYC"
    monkeypatch.setattr(stages, "library_versions", lambda: {"llama-cpp-python": "0.0.1"})
    assert kind_name(labels) != mine
    never = name("never", job="a-job")
    assert name("never", job="a-job") == never and name("never", job="another-job") != never  # each job anew
