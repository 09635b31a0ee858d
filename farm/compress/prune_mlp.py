"""Structured MLP-width pruning: remove the least important intermediate channels of every decoder
block's gated MLP, giving a genuinely smaller dense model (a smaller intermediate_size) that every
runtime runs faster.

Channel j of a block's MLP contributes act(gate_j · x) · (up_j · x) · down[:, j] to its output; its
importance is the mean absolute activation act(gate_j · x) · (up_j · x) over the calibration tokens
times the norm of down[:, j] (activation-based, as in LLM-Pruner's and FLAP's channel scores). Each
block keeps its most important `1 - ratio` of channels, rounded to a multiple of `multiple_of` so
that block-wise quantizers (group sizes 16–64) still divide the new width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from farm.compress.common import Calibrated, calibration_batches, load, run_hooked, save_with_tokenizer
from farm.inputs.modelref import ModelShape
from farm.plugin import FractionGrid, as_list


def kept_width(width: int, ratio: float, multiple_of: int) -> int:
    return max(multiple_of, round(width * (1 - ratio) / multiple_of) * multiple_of)


class Options(Calibrated):
    LABEL = "{ratio}"
    GRID = ("ratio",)
    method: Literal["prune_mlp"]
    ratio: FractionGrid = Field(..., description="Share of every block's MLP channels to remove; a list is a grid.")
    multiple_of: int = Field(64, ge=1, le=4096, description="The kept width is a multiple of this.")

    def check(self, shape: ModelShape):
        if shape.intermediate is None:
            return [], shape
        kept = {r: kept_width(shape.intermediate, r, self.multiple_of) for r in as_list(self.ratio)}
        bad = [r for r, k in kept.items() if k >= shape.intermediate]
        problems = [f"ratio: {bad} keeps all {shape.intermediate} MLP channels at multiples of {self.multiple_of}; "
                    "raise ratio or lower multiple_of"] if bad else []
        return problems, shape.but(intermediate=max(kept.values()))


def channel_importance(model, batches: list) -> list:

    scores, handles = [], []
    for layer in model.model.layers:
        mlp = layer.mlp
        acc = {"sum": 0, "n": 0}
        scores.append(acc)

        def hook(module, args, acc=acc):
            h = args[0].detach().float().abs().flatten(0, -2)  # the input of down_proj: act(gate) * up
            acc["sum"] = acc["sum"] + h.sum(0)
            acc["n"] += h.shape[0]
        handles.append(mlp.down_proj.register_forward_pre_hook(hook))
    run_hooked(model, batches, handles)
    return [acc["sum"] / acc["n"] * layer.mlp.down_proj.weight.float().norm(dim=0)
            for acc, layer in zip(scores, model.model.layers)]


def shrink(mlp, keep) -> None:
    """Keep the given intermediate channels of a gated MLP (rows of gate/up, columns of down)."""
    import torch

    def rows(lin):
        new = torch.nn.Linear(lin.in_features, len(keep), bias=lin.bias is not None, dtype=lin.weight.dtype)
        new.weight.data.copy_(lin.weight.data[keep])
        if lin.bias is not None:
            new.bias.data.copy_(lin.bias.data[keep])
        return new

    down = torch.nn.Linear(len(keep), mlp.down_proj.out_features, bias=mlp.down_proj.bias is not None,
                           dtype=mlp.down_proj.weight.dtype)
    down.weight.data.copy_(mlp.down_proj.weight.data[:, keep])
    if mlp.down_proj.bias is not None:
        down.bias.data.copy_(mlp.down_proj.bias.data)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = rows(mlp.gate_proj), rows(mlp.up_proj), down
    mlp.intermediate_size = len(keep)


def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict:
    import torch

    model = load(model_dir, threads)
    width = model.config.intermediate_size
    kept = kept_width(width, opt.ratio, opt.multiple_of)
    if kept >= width:
        raise ValueError(f"prune_mlp.ratio={opt.ratio} keeps all {width} channels at multiples of "
                         f"{opt.multiple_of}; raise ratio")
    scores = channel_importance(model, calibration_batches(calib, opt, "prune_mlp"))
    for layer, score in zip(model.model.layers, scores):
        keep = torch.sort(torch.topk(score, kept).indices).values
        shrink(layer.mlp, keep)
    model.config.intermediate_size = kept
    save_with_tokenizer(model, model_dir, out)
    return {"intermediate_before": width, "intermediate_after": kept,
            "params_after": sum(p.numel() for p in model.parameters())}
