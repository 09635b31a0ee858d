"""A test-only compression method: scales every decoder block's down_proj by (1 - shrink). It shows what a
method costs: this module (options + apply) and one registry line."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from farm.compress.common import load, save_with_tokenizer
from farm.inputs.modelref import ModelShape
from farm.plugin import FractionGrid, StepOptions


class Options(StepOptions):
    LABEL = "s{shrink}"
    GRID = ("shrink",)
    method: Literal["dummy_shrink"]
    shrink: FractionGrid = Field(0.5, description="Share by which down_proj shrinks; a list is a grid.")

    def check(self, shape: ModelShape):
        if shape.layers is not None and shape.layers < 2:
            return ["method: dummy_shrink needs at least 2 decoder blocks"], shape
        return [], shape


def apply(model_dir: Path, opt: Options, calib, out: Path, threads: int) -> dict:
    import torch

    model = load(model_dir, threads)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(1 - opt.shrink)
    save_with_tokenizer(model, model_dir, out)
    return {"shrink": opt.shrink}
