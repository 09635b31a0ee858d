"""Unstructured and 2:4 semi-structured sparsity in the decoder blocks' linear layers.

criterion  magnitude  |W|                         (smallest weights go)
           wanda      |W| * ||X_j||_2             (Sun et al., 2023: weight times the norm of its input
                                                   channel over the calibration tokens; no retraining)
pattern    unstructured  `sparsity` of each output row's weights set to zero
           2:4           in every 4 consecutive inputs of a row, the 2 lowest-scored set to zero
The model stays dense (zeros stored): llama.cpp, ONNX Runtime and OpenVINO's CPU kernels here run dense
matrices, so expect no speed-up and no smaller file from sparsity alone; quality is what it costs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from farm.compress.common import Calibrated, calibration_batches, load, run_hooked, save_with_tokenizer
from farm.plugin import FractionGrid


class Options(Calibrated):
    LABEL = "{criterion}-{pattern}-{sparsity}"
    GRID = ("sparsity",)
    method: Literal["sparsify"]
    sparsity: FractionGrid = Field(0.5, description="Share of each row's weights set to zero; a list is a grid.")
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    criterion: Literal["magnitude", "wanda"] = "wanda"

    @model_validator(mode="after")
    def _two_four_is_half(self):
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError("sparsity: the 2:4 pattern removes exactly half of the weights; use 0.5")
        return self


def input_norms(model, batches: list) -> dict:
    """Per linear layer in the decoder blocks: the L2 norm of each input channel over all tokens."""
    import torch

    sums: dict = {}
    handles = []
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, args, name=name):
                x = args[0].detach().float().flatten(0, -2)
                sums[name] = sums.get(name, 0) + (x ** 2).sum(0)
            handles.append(mod.register_forward_pre_hook(hook))
    run_hooked(model, batches, handles)
    return {k: v.sqrt() for k, v in sums.items()}


def mask(score, sparsity: float, pattern: str):
    """True where a weight stays."""
    import torch

    if pattern == "2:4":
        rows, cols = score.shape
        groups = score.reshape(rows, cols // 4, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
        return keep.reshape(rows, cols)
    k = int(score.shape[1] * sparsity)
    if k == 0:
        return torch.ones_like(score, dtype=torch.bool)
    cut = score.kthvalue(k, dim=1, keepdim=True).values
    return score > cut


def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict:
    import torch

    model = load(model_dir, threads)
    norms = {}
    if opt.criterion == "wanda":
        norms = input_norms(model, calibration_batches(calib, opt, "sparsify"))
    zeros = total = 0
    with torch.no_grad():
        for name, mod in model.model.layers.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            w = mod.weight.data
            score = w.abs() * norms[name].to(w.dtype) if norms else w.abs()
            w.mul_(mask(score, opt.sparsity, opt.pattern).to(w.dtype))
            zeros += int((w == 0).sum())
            total += w.numel()
    save_with_tokenizer(model, model_dir, out)
    return {"sparsity_achieved": round(zeros / total, 4), "weights_in_scope": total}
