"""The benchmark's handling of other load on the machine, with a fake runtime and a fake /proc/stat."""

import numpy as np
import pytest

from farm import bench


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

    monkeypatch.setattr(bench, "_busy_seconds", busy)
    monkeypatch.setattr(bench, "_own_cpu", lambda: 0.0)
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
    assert r["contaminated"] and len(r["raw"]["used"]) == 2 and r["foreign_cpus"] > bench.CONTAMINATED_CPUS
