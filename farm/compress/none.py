"""The identity: the base model, unchanged (a copy, so every stage owns its output)."""

from __future__ import annotations

import shutil
from pathlib import Path


def apply(model_dir: Path, step: dict, calib, out: Path, threads: int) -> dict:
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    return {}
