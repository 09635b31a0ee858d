"""The sweep file: pydantic models, validation with field paths. Imports neither torch, ray nor mlflow.

The sweep's own fields live here and in farm/sweep/sections.py; each stage kind's section beside its code
(farm/stages/<kind>.py: SECTION, Config), a compression step's, an export's and a runtime's options beside
theirs (farm/compress, farm/export, farm/runtimes: `Options`); `sweep_model()` builds the whole model from the
registries, so a new plug-in needs no line here. Problems read as farm/sweep/messages.py words them, with the
checks against the world of farm/sweep/checks.py.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from farm.compress import METHODS
from farm.errors import SpecError
from farm.export import FORMATS
from farm.plugin import Strict
from farm.runtimes import RUNTIMES
from farm.stages import STAGES
from farm.stages.common import declared
from farm.sweep.checks import calibration_problems, check_world  # noqa: F401 (calibration_problems: a helper of plug-ins' tests)
from farm.sweep.messages import _format_error
from farm.sweep.metrics import MetricName, better, front_constraints  # noqa: F401 (read through this module too)
from farm.sweep.sections import NAME, Constraint, PromoteSpec, Target


# ---- compression steps: the registry's Options models, picked by `method`
def step_options(method: str) -> type:
    return METHODS.options(method)


def step_label(step: dict) -> str:
    """e.g. 'prune_layers-drop4' for {'method': 'prune_layers', 'drop': 4, ...}."""
    label = step_options(step["method"]).label_of(step)
    return f"{step['method']}-{label}" if label else step["method"]


def grid_fields(method: str) -> tuple[str, ...]:
    return step_options(method).GRID


def uses_teacher(method: str) -> bool:
    """Methods that learn from the sweep's base model get it as a dependency."""
    return step_options(method).TEACHER


class Sweep(Strict):
    """The sweep's own fields; `sweep_model()` adds `pipelines` and `exports` typed by the registries and each
    stage kind's section (farm/stages/<kind>.py: SECTION, Config)."""
    name: str = Field(..., pattern=NAME, description="Also the MLflow experiment name.")
    pipelines: list[list[Any]] = Field(
        default_factory=lambda: [[]], min_length=1, description="Compression pipelines; [] is the base model.")
    exports: list[Any] = Field(..., min_length=1)
    targets: list[Target] = Field(default_factory=lambda: [Target(name="any")], min_length=1)
    objectives: dict[MetricName, Literal["min", "max"]] = Field(
        default_factory=lambda: {"perplexity": "min", "decode_tok_s": "max", "size_mb": "min"}, min_length=1
    )
    constraints: list[Constraint] = Field(default_factory=list)
    promote: PromoteSpec = Field(default_factory=PromoteSpec)
    stage_memory_gb: float | None = Field(
        None, gt=0, le=65536,
        description="Memory (GiB) each compress/export/evaluate stage reserves from Ray and may use: one that "
                    "grows past it is stopped and its cells fail with the reason, before it can take the node's "
                    "other work down. Unset: Ray reserves ~3x the float model + 1 GiB and only Ray's node-level "
                    "OOM killer acts.")
    stage_cpus: int = Field(
        1, ge=1, le=1024,
        description="CPUs each compress/export/evaluate stage reserves from Ray, and the threads it then uses. "
                    "1 packs many small stages on a node; raise it for big models on big nodes (benchmarks always "
                    "take their whole node).")

    def metrics_used(self) -> list[str]:
        """Every metric the objectives, constraints and promote policy name."""
        return [*self.objectives, *(c.metric for c in self.constraints), self.promote.metric]

    @model_validator(mode="after")
    def _kinds(self) -> Sweep:
        """Each stage kind's checks of the sweep as a whole (a metric it measures needs its section, ...)."""
        for module in STAGES.modules():
            check = getattr(module, "check", None)
            if check:
                check(self)
        return self

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, targets: list[Target]) -> list[Target]:  # with the other fields' errors, not after
        names = [t.name for t in targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target names must be unique, repeated: {', '.join(dupes)}")
        return targets

    @property
    def model_name(self) -> str:
        return self.promote.model_name or self.name


def _union(options: tuple[type, ...], key: str):
    return Annotated[Union[options], Field(discriminator=key)]  # noqa: UP007 (a tuple of types)


def _section(module) -> tuple:
    config, doc = module.Config, (module.Config.__doc__ or "").strip().splitlines()
    if declared(module, "OPTIONAL"):
        return (config | None, Field(None, description=(doc[0] if doc else module.SECTION) + " Unset: none."))
    return (config, Field(default_factory=config))


@functools.cache
def _sweep_model(versions: tuple[int, ...]) -> type[Sweep]:
    step = _union(METHODS.all_options(), "method")
    export = _union(FORMATS.all_options(), "format")
    sections = {m.SECTION: _section(m) for m in STAGES.modules() if declared(m, "SECTION")}
    return create_model(
        "Sweep", __base__=Sweep, **sections,
        pipelines=(list[list[step]], Field(default_factory=lambda: [[]], min_length=1,
                                           description="Compression pipelines; [] is the base model.")),
        exports=(list[export], Field(..., min_length=1, description="Export formats and their levels.")))


def sweep_model() -> type[Sweep]:
    """The Sweep model with the unions of every registered method and format, and every stage kind's section."""
    return _sweep_model((METHODS.version, FORMATS.version, RUNTIMES.version, STAGES.version))


def parse(data: Any, source: str = "sweep") -> Sweep:
    """Validate a sweep given as plain data; raise SpecError with one message per problem."""
    if not isinstance(data, dict):
        raise SpecError([f"(top level): expected a mapping of keys, got {type(data).__name__}"], source)
    problems: list[str] = []
    sweep = None
    try:
        sweep = sweep_model().model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            text = _format_error(err)
            if text not in problems:  # a bad key inside a union is reported once, not once per branch
                problems.append(text)
    problems += [p for p in check_world(data) if p not in problems]
    if problems:
        raise SpecError(problems, source)
    return sweep


def load(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"file '{path}' does not exist — give the path of a sweep YAML file"], str(path))
    return loads(path.read_text(encoding="utf-8"), str(path))


def loads(text: str, source: str = "sweep") -> Sweep:
    try:
        data = yaml.safe_load(text)
        return parse(data, source)
    except yaml.YAMLError as e:
        raise SpecError([f"not valid YAML: {e}"], source) from None
    except RecursionError:  # "[[[[..." thousands deep, or an alias that contains itself
        raise SpecError(["the file nests lists or mappings too deeply (or an alias contains itself); a sweep "
                         "is a few levels deep — see jobs/demo.yaml"], source) from None


def json_schema() -> dict:
    return sweep_model().model_json_schema()
