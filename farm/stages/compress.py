"""One compression step (farm/compress: a method per module) on the model the previous step left."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from farm.stages.common import model_dir, threads_here

KIND = "compress"


def code(params: dict) -> list[str]:
    from farm.compress import METHODS

    return [METHODS.module_name(params["step"]["method"])]


def run(stage, deps: list[dict], out: Path) -> dict:
    from farm.compress import run_method

    model, reference, *teacher = deps  # methods that learn from the base model get it third
    step = stage.params["step"]
    calib = np.load(Path(reference["reference_dir"]) / "calib_tokens.npy")
    (out / "model").mkdir()
    teacher_dir = model_dir(teacher[0]) if teacher else None
    info = run_method(step["method"], model_dir(model), step, calib, out / "model", threads_here(), teacher_dir)
    return {"model_dir": "model", "info": info}


def label(params: dict) -> str:
    return f"compress {params['step']['method']}"
