"""Structured layer pruning by block influence (ShortGPT, Men et al. 2024).

Each decoder block's influence is 1 - mean cosine similarity between the hidden state entering it
and the hidden state leaving it, over calibration tokens. The `drop` blocks with the lowest influence
change the residual stream least and are removed; the result is a genuinely smaller dense model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from farm.compress.common import (
    Calibrated,
    calibration_batches,
    drop_layers,
    load,
    run_hooked,
    save_with_tokenizer,
)
from farm.inputs.modelref import ModelShape
from farm.plugin import PositiveGrid, as_list


class Options(Calibrated):
    LABEL = "drop{drop}"
    GRID = ("drop",)
    method: Literal["prune_layers"]
    drop: PositiveGrid = Field(
        ..., description="How many decoder blocks to drop; a list makes one pipeline per value (grid).")

    def check(self, shape: ModelShape):
        if shape.layers is None:
            return [], shape
        too_many = [k for k in as_list(self.drop) if k >= shape.layers]
        problems = [f"drop: {too_many} would leave no decoder block (the model entering this step has "
                    f"{shape.layers}); use 1..{shape.layers - 1}"] if too_many else []
        return problems, shape.but(layers=max(1, shape.layers - min(as_list(self.drop))))


def block_influence(model, batches: list) -> list[float]:
    import torch

    layers = model.model.layers
    sims = [[] for _ in layers]
    inputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(module, args, kwargs):
            inputs[i] = kwargs.get("hidden_states", args[0] if args else None)
        return hook

    def post(i):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(inputs[i].float(), out.float(), dim=-1)
            sims[i].append(cos.flatten())
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    run_hooked(model, batches, handles)
    return [float(1 - torch.cat(s).mean()) for s in sims]




def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict:
    model = load(model_dir, threads)
    n_layers = len(model.model.layers)
    k = int(opt.drop)
    if not 1 <= k < n_layers:
        raise ValueError(f"prune_layers.drop={k}: the model has {n_layers} blocks; drop 1..{n_layers - 1}")
    scores = block_influence(model, calibration_batches(calib, opt, "prune_layers"))
    drop = sorted(np.argsort(scores)[:k].tolist())
    drop_layers(model, drop)
    save_with_tokenizer(model, model_dir, out)
    return {"dropped_layers": drop, "block_influence": [round(s, 5) for s in scores],
            "layers_before": n_layers, "layers_after": n_layers - k}
