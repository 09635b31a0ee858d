"""The job log's progress line: counts, what runs where, and an ETA from the stage times so far."""

import copy
from pathlib import Path

import yaml

from farm.plan import grid
from farm.run.progress import Progress, duration
from farm.sweep import spec

DEMO = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml").read_text())


def small_grid():
    d = copy.deepcopy(DEMO)
    d["pipelines"] = [[]]
    d["exports"] = [{"format": "gguf", "quant": ["F16", "Q8_0"]}]
    return grid.build(spec.parse(d))


def test_counts_running_and_eta():
    g = small_grid()
    kinds = {}
    for sid, s in g.stages.items():
        kinds.setdefault(s.kind, []).append(sid)
    p = Progress(g, now=0.0)
    assert "ETA ?" in p.line(now=1.0)  # nothing has run yet: no guess
    p.stage_finished(kinds["base"][0], {"seconds": 5.0, "cached": False})
    p.stage_finished(kinds["reference"][0], {"seconds": 99.0, "cached": True})  # reused: costs nothing
    exports = kinds["export"]
    p.stage_finished(exports[0], {"seconds": 10.0})
    p.stage_failed(exports[1])
    p.set_running({kinds["bench"][0]: "a", exports[0]: "b"})  # a finished stage is not running any more
    line = p.line(now=30.0)
    n = len([s for s in g.stages.values() if s.kind not in ("tasks", "serve")])  # those phases report for themselves
    assert n < len(g.stages)
    # grid order: the torch baseline first, so exports[0] is its (finished) export and exports[1] the F16 export
    # (failed). Queued = inputs done, not running: only the baseline's evaluate (its bench is running; Q8_0
    # waits on the failed F16; F16's evaluate/bench will never run)
    assert f"stages 3/{n} done (1 reused), 1 running, 1 queued, 1 failed" in line, line
    assert "running: bench torch fp32 @local on a" in line
    assert f"cells 0/{len(g.cells)} done" in line and "running: bench " in line and "on a" in line
    # work done 15 s in 30 s of wall time; left: the other exports at their mean (10 s) and the rest at the
    # mean of everything that ran (7.5 s) -> (10 * (exports - 2) + 7.5 * others) / 0.5
    left = [s for sid, s in g.stages.items() if sid not in p.done and sid not in p.failed
            and s.kind not in ("tasks", "serve")]
    want = sum(10.0 if s.kind == "export" else 7.5 for s in left) / (15.0 / 30.0)
    assert abs(p.eta(now=30.0) - want) < 1e-9 and f"ETA ~{duration(want)}" in line
    p.set_running(None)  # Ray's state API did not answer: unknown, not zero
    assert ", ? running, " in p.line(now=30.0) and "running: " not in p.line(now=30.0)
    p.cell_logged(failed=True)
    assert f"cells 1/{len(g.cells)} done, 1 failed" in p.line(now=31.0)


def test_durations_read_well():
    assert (duration(42), duration(125), duration(7300)) == ("42s", "2m05s", "2h01m")
