"""The sweep's own sections that belong to no stage kind: where benchmarks run (targets), what the front must
respect (constraints) and what is promoted. A stage kind's section (bench, data, serve, tasks, ...) is declared in
its own module (farm/stages/<kind>.py: SECTION, Config)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from farm.plugin import Strict
from farm.sweep.metrics import MetricName

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"


class Target(Strict):
    name: str = Field(..., pattern=NAME)
    labels: dict[str, str] = Field(
        default_factory=dict, description="Ray label selector: the node labels a benchmark must run on."
    )

    @field_validator("labels")
    @classmethod
    def _keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.match(LABEL_KEY, key):
                raise ValueError(f"label key '{key}' is not a valid Ray/Kubernetes label key")
        return v


class Constraint(Strict):
    metric: MetricName
    max: float | None = None
    min: float | None = None
    max_ratio_to_baseline: float | None = Field(None, gt=0)
    min_ratio_to_baseline: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_bound(self) -> Constraint:
        bounds = [self.max, self.min, self.max_ratio_to_baseline, self.min_ratio_to_baseline]
        if all(b is None for b in bounds):
            raise ValueError("give at least one of max, min, max_ratio_to_baseline, min_ratio_to_baseline")
        return self


class PromoteSpec(Strict):
    model_name: str | None = Field(None, pattern=NAME, description="Registered model; default: the sweep name.")
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
    metric: MetricName = Field("decode_tok_s", description="Among the Pareto front, the cell best on this metric.")
