"""The metric vocabulary, read from the stage kinds that produce each metric (farm/stages/<kind>.py: METRICS):
which names a sweep may use in its objectives, constraints and promote policy, the direction in which each gets
better, its axis label, and which kind (and so which phase of the job) measures it."""

from __future__ import annotations

import difflib
import re
import functools
from typing import Annotated

from pydantic import AfterValidator

from farm.stages import STAGES
from farm.stages.common import declared


@functools.cache
def _vocabulary(version: int) -> tuple[tuple[str, object], ...]:
    return tuple((m.KIND, x) for m in STAGES.modules() for x in declared(m, "METRICS"))


def vocabulary() -> tuple[tuple[str, object], ...]:
    """(kind, farm.plugin.Metric) for every metric every registered stage kind declares."""
    return _vocabulary(STAGES.version)


def find(metric: str):
    """(kind, Metric) of the kind that measures `metric`, or None."""
    return next(((k, m) for k, m in vocabulary() if m.matches(metric)), None)


def producer(metric: str) -> str | None:
    found = find(metric)
    return found[0] if found else None


def later(kind: str | None = None):
    """For the front (farm.decide.pareto.feasible): metric -> the kind that measures it where that is `kind`, or
    (kind None) any kind of a later phase (AFTER), else None."""
    after = {m.KIND for m in STAGES.modules() if declared(m, "AFTER")} if kind is None else {kind}
    return lambda metric: producer(metric) if producer(metric) in after else None


def better(metric: str) -> str:
    found = find(metric)
    if found is None:
        raise KeyError(f"unknown metric '{metric}'")
    return found[1].better


def label_of(metric: str) -> str:
    found = find(metric)
    return (found[1].label if found and found[1].label else metric)


def _known(metric: str) -> str:
    if find(metric) is None:
        names = [m.name for _, m in vocabulary() if not m.pattern]
        close = difflib.get_close_matches(metric, names, n=1, cutoff=0.6)
        families = ", ".join(readable(m.name) for _, m in vocabulary() if m.pattern)
        raise ValueError(f"unknown metric '{metric}'" + (f" — did you mean '{close[0]}'?" if close else "")
                         + f" (allowed: {', '.join(names)}; and the families {families})")
    return metric


def readable(pattern: str) -> str:
    """A metric family's pattern as a user reads it: 'serve_[prefix_]output_tok_s_c<N>', 'acc.{arc_easy,...}'."""
    p = pattern.replace("\\.", ".").replace("[1-9][0-9]*", "<N>")
    p = re.sub(r"\(([^()|]*)\)\?", r"[\1]", p)
    return re.sub(r"\(([^()]*\|[^()]*)\)", lambda m: "{" + m.group(1).replace("|", ",") + "}", p)


MetricName = Annotated[str, AfterValidator(_known)]


def front_constraints(spec: dict) -> list[dict]:
    """The sweep's constraints as plain dicts, plus those its stage kinds add (the tasks consistency gate)."""
    out = [dict(c) for c in spec.get("constraints") or []]
    for module in STAGES.modules():
        hook = getattr(module, "constraints", None)
        out += hook(spec) if hook else []
    return out
