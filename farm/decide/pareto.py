"""The Pareto front: non-dominated cells under the sweep's objectives, after its constraints. Pure.

A row is {"id", "target", "baseline": bool, "metrics": {...}} (farm.record.cells.row), and may say which
later-phase measurements failed for it ("failed_later": their kinds) and that its benchmark was disturbed by other load ("contaminated": True:
never feasible, since its speed is not the cell's). Constraints relative to the baseline
use the baseline row of the same target. A row dominates another when it is at least as good on every
objective and strictly better on one; equal points do not dominate each other. The front is computed
per target, since speed measured on different nodes is not comparable.
"""

from __future__ import annotations

import math


def feasible(row: dict, constraints: list[dict], baseline: dict | None, later=None) -> tuple[bool, str]:
    """later(metric) -> the kind of a later phase that measures the metric only where it decides (task accuracy
    on the front), else None: missing, such a metric does not exclude a row unless that kind failed for it; a
    row is measured once it reaches the front."""
    if row.get("contaminated"):  # its speed is not the cell's: never on a front, never promoted
        return False, "benchmark contaminated by other load on the node (farm.bench.contaminated)"
    m = row["metrics"]
    for c in constraints:
        v = m.get(c["metric"])
        if isinstance(v, float) and math.isnan(v):  # measured, or derived, and unknowable: nothing to check
            return False, f"{c['metric']} could not be measured"
        if v is None:
            kind = later(c["metric"]) if later is not None else None
            if kind and kind not in (row.get("failed_later") or ()):
                continue
            return False, f"{c['metric']} missing"
        if c.get("max") is not None and v > c["max"]:
            return False, f"{c['metric']}={v:.4g} above max {c['max']}"
        if c.get("min") is not None and v < c["min"]:
            return False, f"{c['metric']}={v:.4g} below min {c['min']}"
        for key, sign in (("max_ratio_to_baseline", 1), ("min_ratio_to_baseline", -1)):
            if c.get(key) is None:
                continue
            if baseline is None or c["metric"] not in baseline["metrics"]:
                return False, f"no baseline value of {c['metric']}"
            b = baseline["metrics"][c["metric"]]
            if sign * v > sign * c[key] * b:
                return False, f"{c['metric']}={v:.4g} violates {key} {c[key]} x baseline {b:.4g}"
    return True, ""


def dominates(a: dict, b: dict, objectives: dict[str, str]) -> bool:
    better = False
    for metric, direction in objectives.items():
        x, y = a["metrics"][metric], b["metrics"][metric]
        if direction == "min":
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def front(rows: list[dict], objectives: dict[str, str], constraints: list[dict], later=None) -> dict[str, dict]:
    """id -> {"feasible", "reason", "pareto"} for every row (`later`: see feasible)."""
    out: dict[str, dict] = {}
    by_target: dict[str, list[dict]] = {}
    for r in rows:
        by_target.setdefault(r["target"], []).append(r)
    for group in by_target.values():
        baseline = next((r for r in group if r.get("baseline")), None)
        ok = []
        for r in group:
            missing = [m for m in objectives if m not in r["metrics"]]
            good, reason = feasible(r, constraints, baseline, later)
            if missing:
                good, reason = False, f"missing objective(s) {missing}"
            out[r["id"]] = {"feasible": good, "reason": reason, "pareto": False}
            if good:
                ok.append(r)
        for r in ok:
            out[r["id"]]["pareto"] = not any(dominates(o, r, objectives) for o in ok if o is not r)
    return out


def pick(rows: list[dict], status: dict[str, dict], metric: str, direction: str) -> dict | None:
    """The Pareto row best on one metric (ties: the first)."""
    cands = [r for r in rows if status[r["id"]]["pareto"] and metric in r["metrics"]]
    if not cands:
        return None
    sign = 1 if direction == "max" else -1
    return max(cands, key=lambda r: sign * r["metrics"][metric])


def table(rows: list[dict], status: dict[str, dict], columns: list[str]) -> str:
    head = ["run", "cell"] + columns + ["pareto"]
    lines = [head]
    for r in sorted(rows, key=lambda r: (r["target"], r["label"])):
        vals = [r["id"][:8], r["label"]]
        for c in columns:
            v = r["metrics"].get(c)
            vals.append("-" if v is None else f"{v:.4g}")
        s = status[r["id"]]
        vals.append("*" if s["pareto"] else ("" if s["feasible"] else "x"))
        lines.append(vals)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def served(rows: list[dict], runtime_of: dict[str, str], objectives: dict[str, str], constraints: list[dict],
           mode: str, per_runtime: int, metric: str, direction: str, later=None) -> list[str]:
    """The cells a serve benchmark takes (ids), `per_runtime` at most per runtime, best on `metric` first.
    runtime_of: id -> runtime name, for the servable cells only. mode: 'front' (on the sweep's Pareto front),
    'format_front' (on the front among the runtime's own cells; constraints still relative to the baseline),
    'all' (every servable cell that meets the constraints). later: see feasible."""
    sign = 1 if direction == "max" else -1
    status = front(rows, objectives, constraints, later)
    out = []
    for runtime in sorted(set(runtime_of.values())):
        mine = [r for r in rows if runtime_of.get(r["id"]) == runtime and status[r["id"]]["feasible"]]
        if mode == "front":
            mine = [r for r in mine if status[r["id"]]["pareto"]]
        elif mode == "format_front":
            mine = [r for r in mine if not any(dominates(o, r, objectives) for o in mine
                                               if o is not r and o["target"] == r["target"])]
        mine.sort(key=lambda r: -sign * r["metrics"].get(metric, -sign * math.inf))
        out += [r["id"] for r in mine[:per_runtime]]
    return out
