"""What every plug-in's options are made of. Torch-free: the spec imports these to validate a sweep.

A compression method, an export format and a runtime each define an `Options` model beside their code
(farm/compress/<method>.py, farm/export/<format>_export.py, farm/runtimes/<runtime>_rt.py); the spec builds
its unions from the registries. Options are frozen pydantic models; a field whose name is in GRID may hold a
list, which makes one variant per value. `check(shape)` sees the model entering the step (farm.inputs.modelref) and
returns the problems it finds, as 'field: what is wrong and what to do', before any task runs.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from farm.inputs.modelref import ModelShape

Problems = list[str]


class Strict(BaseModel):
    """A section of the sweep file: unknown keys are errors."""
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Metric:
    """One figure a stage kind produces, declared where it is measured (farm/stages/<kind>.py): the spec, the
    front, the report and the plots read the vocabulary from there. `name` is the metric's name, or a regular
    expression for a family (serve_output_tok_s_c4, acc.piqa) when `pattern` is set."""
    name: str
    better: str  # "min" | "max"
    unit: str = ""
    label: str = ""  # an axis label; default: the name
    pattern: bool = False
    short: str = ""  # how a progress line names it (empty: not shown there)
    fmt: str = ".4g"

    def matches(self, metric: str) -> bool:
        return re.fullmatch(self.name, metric) is not None if self.pattern else metric == self.name


def as_list(v: Any) -> list:
    return list(v) if isinstance(v, list) else [v]


def _checked(test, what: str):
    def check(v):
        values = as_list(v)
        if not values or not all(test(x) for x in values):
            raise ValueError(f"must be {what} or a non-empty list of them, got {v!r}")
        return v
    return AfterValidator(check)


# field types whose list value makes a grid (one variant per value)
PositiveGrid = Annotated[int | list[int], _checked(lambda k: k >= 1, "a positive integer")]
FractionGrid = Annotated[float | list[float], _checked(lambda x: 0 < x < 1, "a fraction strictly between 0 and 1")]
UnitGrid = Annotated[float | list[float], _checked(lambda x: 0 <= x <= 1, "a number between 0 and 1 inclusive")]
BoolGrid = Annotated[bool | list[bool], _checked(lambda x: isinstance(x, bool), "true or false")]


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    GRID: ClassVar[tuple[str, ...]] = ()  # fields whose list value makes one variant per value
    LABEL: ClassVar[str] = ""  # how a cell's label shows these options, e.g. "drop{drop}"
    TAGS: ClassVar[dict[str, str]] = {}  # optional fields shown when set to other than their default

    def expand(self) -> list[dict]:
        """One plain dict per combination of the grid fields' values."""
        data = self.model_dump()
        keys = [k for k in self.GRID if isinstance(data.get(k), list)]
        return [{**data, **dict(zip(keys, combo))} for combo in itertools.product(*(data[k] for k in keys))]

    @classmethod
    def label_of(cls, values: dict) -> str:
        parts = [cls.LABEL.format(**values, teacher_tag="" if values.get("teacher", True) else "-noteacher")]
        parts += [t.format(**values) for k, t in cls.TAGS.items()
                  if values.get(k) not in (None, 0, False) and values.get(k) != cls.model_fields[k].default]
        return "-".join(p for p in parts if p)


class StepOptions(Options):
    """A compression step; the `method` field (a Literal) names it."""
    TEACHER: ClassVar[bool] = False  # learns from the sweep's base model (given to apply as teacher_dir)

    def check(self, shape: ModelShape) -> tuple[Problems, ModelShape]:
        """Problems with these options on a model of this shape, and the shape of the model leaving the
        step (for a grid: the largest it can be)."""
        return [], shape

    @classmethod
    def with_scored(cls, step: dict, scored: dict[str, str]) -> dict:
        """The step's data as the sweep runs it, given what the sweep scores (task -> 'held_out' | 'split';
        farm.stages.common.scored_tasks): a step that learns from data keeps those items out of it and records
        them in its options, so its stage id follows them. Default: the step unchanged (and its id)."""
        return step


class Calibrated(StepOptions):
    """A step that reads calibration sequences."""
    calib_samples: int = Field(8, ge=1, le=1024, description="Calibration sequences.")
    seq_len: int = Field(256, ge=16, le=8192, description="Tokens per calibration sequence.")


class RuntimeOptions(Options):
    """How a runtime runs an artifact; `name` (a Literal) names the runtime, FORMATS what it can load,
    REQUIREMENTS what a promoted model needs to run with it (pip names)."""
    TITLE: ClassVar[str] = ""  # how messages name it: "llama.cpp"
    FORMATS: ClassVar[tuple[str, ...]] = ()
    REQUIREMENTS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def label_of(cls, values: dict) -> str:
        return "-".join(t.format(**values) for k, t in cls.TAGS.items() if values.get(k) != cls.model_fields[k].default)

    def describe(self) -> str:
        """'llamacpp (amx, no repack)': the options that differ from their defaults."""
        opts = [k if v else f"no {k}" for k, v in self.model_dump().items()
                if k != "name" and v != type(self).model_fields[k].default and isinstance(v, bool)]
        return self.name + (f" ({', '.join(opts)})" if opts else "")  # type: ignore[attr-defined]


def group_problems(group: int, shape: ModelShape, field: str = "group_size") -> Problems:
    """A block-wise quantizer's group must divide every linear layer's input width."""
    bad = {k: w for k, w in shape.widths().items() if w % group}
    if not bad:
        return []
    fits = [g for g in (16, 32, 64, 128, 256) if all(w % g == 0 for w in shape.widths().values())]
    return [f"{field}: {group} does not divide the model's {', '.join(f'{k} {w}' for k, w in bad.items())}; "
            f"use one of {fits}"]


def architecture_problems(method: str, shape: ModelShape, supported: tuple[str, ...]) -> Problems:
    if shape.model_type is None or shape.model_type in supported:
        return []
    return [f"method: {method} supports the architectures {', '.join(supported)}; this model is "
            f"'{shape.model_type}' — remove the step or use another method"]
