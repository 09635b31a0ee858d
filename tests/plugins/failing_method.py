"""A test-only method that raises: a stage that fails deterministically at run time, for the e2e test of
failures as data (every limit a real method knows is checked at validation, before the sweep runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from farm.plugin import StepOptions


class Options(StepOptions):
    method: Literal["fail_at_run_time"]
    message: str = "this step always fails"


def apply(model_dir: Path, opt: Options, calib, out: Path, threads: int) -> dict:
    raise ValueError(opt.message)
