"""What a running sweep prints: stages and cells done / running / failed, what runs where, an ETA.

Pure bookkeeping (no Ray): the driver tells it when a stage finishes or fails and which tasks Ray
reports running; `line()` is one plain log line, readable in the submitting terminal and in
`ray job logs` alike (no carriage returns or live bars: a job log keeps every byte).

The ETA is work left over work rate: each stage kind's cost is the mean time of the stages of that
kind that ran so far (a reused stage costs nothing), the rate is the work done per second of wall
time, so it accounts for the cluster's parallelism as it actually was. No ETA until some stage of
the kinds still ahead has run.
"""

from __future__ import annotations

import time
from collections import defaultdict


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def stage_label(stage) -> str:
    """'export gguf Q4_0', 'compress prune_layers' (a kind's own label()), or the kind ('evaluate', 'bench': see
    describe)."""
    from farm.stages import STAGES

    label = getattr(STAGES.get(stage.kind), "label", None)
    return label(stage.params) if label else stage.kind


class Progress:
    def __init__(self, grid, now: float | None = None, stages: list[str] | None = None, phase: str = ""):
        """stages: the stage ids this line follows (default every stage); phase: a later phase's name, whose
        line then counts stages only (its cells were logged in the sweep phase)."""
        self.grid = grid
        self.phase = phase
        if stages is None:  # the sweep phase: a later phase's stages come after every cell and report for themselves
            from farm.stages.common import declared

            stages = [sid for sid, st in grid.stages.items() if not declared(st.kind, "AFTER")]
        self.stages = {sid: grid.stages[sid] for sid in stages}
        self.t0 = time.time() if now is None else now
        self.done: dict[str, float] = {}  # stage id -> seconds it ran (0 when reused)
        self.reused: set[str] = set()
        self.failed: set[str] = set()
        self.running: dict[str, str] = {}  # stage id -> where
        self.running_known = True
        self.cells_done = 0
        self.cells_failed = 0
        self.export_of: dict[str, dict] = {}  # stage id -> the export params a measurement reads
        for c in grid.cells:
            for sid in c.stages.values():
                self.export_of[sid] = grid.stages[c.export].params

    def stage_finished(self, sid: str, result: dict) -> None:
        self.running.pop(sid, None)
        cached = bool(result.get("cached"))
        self.done[sid] = 0.0 if cached else float(result.get("seconds", 0.0))
        if cached:
            self.reused.add(sid)

    def stage_failed(self, sid: str) -> None:
        self.running.pop(sid, None)
        self.failed.add(sid)

    def cell_logged(self, failed: bool) -> None:
        self.cells_done += 1
        self.cells_failed += failed

    def set_running(self, where: dict[str, str] | None) -> None:
        """stage id -> node, as Ray reports its RUNNING tasks (only those not finished here yet); None: Ray's
        state API did not answer, so what runs is unknown this time."""
        self.running_known = where is not None
        self.running = {sid: node for sid, node in (where or {}).items() if sid not in self.done and sid not in self.failed}

    def eta(self, now: float | None = None) -> float | None:
        now = time.time() if now is None else now
        ran = defaultdict(list)
        for sid, secs in self.done.items():
            if sid not in self.reused:
                ran[self.grid.stages[sid].kind].append(secs)
        if not ran:
            return None
        mean_all = sum(map(sum, ran.values())) / sum(map(len, ran.values()))
        cost = {k: sum(v) / len(v) for k, v in ran.items()}
        left = [s for sid, s in self.stages.items() if sid not in self.done and sid not in self.failed]
        if not left:
            return 0.0
        if not any(s.kind in cost for s in left):
            return None
        work_left = sum(cost.get(s.kind, mean_all) for s in left)
        work_done = sum(self.done.values())
        elapsed = max(now - self.t0, 1e-6)
        return work_left / (work_done / elapsed) if work_done > 0 else None

    def queued(self) -> int:
        """Stages whose inputs are all done that are not running yet: waiting for a CPU, memory or a node."""
        over = set(self.done) | self.failed
        return sum(1 for sid, st in self.stages.items()
                   if sid not in over and sid not in self.running
                   and all(d in self.done or d not in self.stages for d in st.deps))

    def describe(self, sid: str) -> str:
        stage = self.grid.stages[sid]
        label = stage_label(stage)
        if sid in self.export_of:  # a measurement: of which export, on which target
            e = self.export_of[sid]
            label += f" {e['format']} {e['quant']}"
            if "target" in stage.params:
                label += f" @{stage.params['target']['name']}"
        return label

    def line(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        n_stages, n_cells = len(self.stages), len(self.grid.cells)
        eta = self.eta(now)
        running = str(len(self.running)) if self.running_known else "?"
        queued = self.queued()
        parts = [f"farm: {duration(now - self.t0)}" + (f" {self.phase}" if self.phase else ""),
                 (f"stages {len(self.done)}/{n_stages} done ({len(self.reused)} reused), {running} running, "
                  + (f"{queued} queued, " if queued else "") + f"{len(self.failed)} failed")]
        if not self.phase:
            parts.append(f"cells {self.cells_done}/{n_cells} done, {self.cells_failed} failed")
        parts.append("ETA " + ("?" if eta is None else "~" + duration(eta)))
        line = " | ".join(parts)
        if self.running:
            line += " | running: " + "; ".join(f"{self.describe(s)} on {w}" for s, w in sorted(self.running.items()))
        return line
