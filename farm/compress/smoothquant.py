"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before W8A8 quantization.

A few input channels of an LLM's linear layers carry activations far larger than the rest, and a
per-tensor int8 activation scale (ONNX Runtime's dynamic quantization, the onnx `int8_dynamic` level)
spends its range on them. For each input channel j of a group of linears sharing an input,

  s_j = max|X_j|^α / max|W_:,j|^(1-α)      (maxima over the calibration tokens and the group's rows)

divides the activations (folded into the op before: the RMSNorm weight before q/k/v and before
gate/up, and with `down_proj`, the rows of up_proj before down_proj) and multiplies the weights'
input columns. The model computes the same function, in float32, to rounding; only a quantizer that
follows sees the difference: flatter activations, slightly spikier weights. α = 0.5 splits the
difficulty evenly; higher α pushes more of it into the weights.
The final norm, the embedding and the (tied) lm_head are not touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from farm.compress.common import (
    FOLDABLE,
    Calibrated,
    calibration_batches,
    fold,
    load,
    run_hooked,
    save_with_tokenizer,
)
from farm.inputs.modelref import ModelShape
from farm.plugin import UnitGrid, architecture_problems


class Options(Calibrated):
    LABEL = "a{alpha}"
    GRID = ("alpha",)
    method: Literal["smoothquant"]
    alpha: UnitGrid = Field(
        0.5, description="Migration strength in [0, 1]: s = max|X|^alpha / max|W|^(1-alpha); a list is a grid.")
    down_proj: bool = Field(True, description="Also smooth down_proj's input (folded into up_proj's rows).")
    calib_samples: int = Field(16, ge=1, le=1024, description="Calibration sequences.")

    def check(self, shape: ModelShape):
        return architecture_problems("smoothquant", shape, FOLDABLE), shape



def smoothing_groups(layer, down_proj: bool) -> list:
    """(op before, linears sharing its output as their input)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
              (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])]
    if down_proj:
        groups.append((mlp.up_proj, [mlp.down_proj]))
    return groups


def input_max(model, linears: list, batches: list) -> dict:
    """max |x_j| per input channel of each given linear over the calibration tokens."""
    import torch

    got: dict = {}
    handles = []
    for lin in linears:
        def hook(m, args, lin=lin):
            x = args[0].detach().float().abs().flatten(0, -2).amax(0)
            got[lin] = torch.maximum(got[lin], x) if lin in got else x
        handles.append(lin.register_forward_pre_hook(hook))
    run_hooked(model, batches, handles)
    return got


def smoothing_scale(x_max, weights: list, alpha: float):
    import torch

    w_max = torch.cat([w.abs() for w in weights]).amax(0)
    s = x_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))


def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict:
    import torch

    model = load(model_dir, threads)
    if model.config.model_type not in FOLDABLE:
        raise ValueError(f"smoothquant: folds scales into Llama-style RMSNorm blocks ({', '.join(FOLDABLE)}); "
                         f"this model is '{model.config.model_type}'")
    batches = calibration_batches(calib, opt, "smoothquant")
    groups = [g for layer in model.model.layers for g in smoothing_groups(layer, opt.down_proj)]
    x_max = input_max(model, [lins[0] for _, lins in groups], batches)
    before, after = [], []
    with torch.no_grad():
        for prev, lins in groups:
            xm = x_max[lins[0]]
            s = smoothing_scale(xm, [lin.weight.data for lin in lins], opt.alpha)
            fold(prev, lins, s)  # prev / s, the linears * s: the same function
            before.append(float(xm.max() / xm.mean()))
            after.append(float((xm / s).max() / (xm / s).mean()))
    save_with_tokenizer(model, model_dir, out)
    return {"groups_smoothed": len(groups), "alpha": opt.alpha,
            "act_max_over_mean_before": round(float(np.mean(before)), 2),
            "act_max_over_mean_after": round(float(np.mean(after)), 2)}
