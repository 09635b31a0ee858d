"""The identity: the base model, unchanged (a copy, so every stage owns its output)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from farm.plugin import StepOptions


class Options(StepOptions):
    method: Literal["none"]


def apply(model_dir: Path, opt: Options, calib, out: Path, threads: int) -> dict:
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    return {}
