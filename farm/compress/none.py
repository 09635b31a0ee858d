"""The identity: the base model, unchanged (a copy, so every stage owns its output)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from farm import storage
from farm.plugin import StepOptions


class Options(StepOptions):
    method: Literal["none"]


def apply(model_dir: Path, opt: Options, calib, out: Path, threads: int) -> dict:
    storage.copy_tree(model_dir, out)
    return {}
