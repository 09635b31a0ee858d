"""AWQ, activation-aware weight quantization (Lin et al., 2023), written out in torch.

Weights that meet large activations matter most. AWQ scales each input channel j of a group of linear
layers by s_j = mean|x_j|^α (normalised so that max·min = 1) and divides the op before them by s, so
the model computes the same function while the salient channels' weights become larger, and so lose
less to rounding. Per decoder block, in order, for each group

  input_layernorm          -> q_proj, k_proj, v_proj   (the loss is the attention's output)
  v_proj rows              -> o_proj                   (only when v and o widths agree: not with GQA)
  post_attention_layernorm -> gate_proj, up_proj       (the loss is the MLP's output)
  up_proj rows             -> down_proj                (the loss is down_proj's output)

α is searched on `n_grid` points of [0, 1] (α = 0 is plain round-to-nearest) for the smallest mean
squared error of the sub-module's output with the group's weights quantized on the grid (farm.compress
.gptq: llama.cpp's Q4_0 by default, or int4 sym/asym by `group_size`). Then, with `clip`, each layer
but q/k gets the per-group clipping threshold (down to half the max) that minimises its own output
error once quantized.

The output is the scaled (and clipped) float model, not rounded: the exporter's quantizer (GGUF Q4_0,
int4 levels) does the rounding the search assumed. `round: true` writes the grid's de-quantized weights
instead. The final norm, the embedding and the lm_head (tied to the embedding here) are never scaled.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from farm.compress.common import (
    FOLDABLE,
    QuantGrid,
    block_inputs,
    calibration_batches,
    check_group,
    fold,
    load,
    rtn,
    run_block,
    save_with_tokenizer,
)
from farm.inputs.modelref import ModelShape
from farm.plugin import architecture_problems


class Options(QuantGrid):
    method: Literal["awq"]
    n_grid: int = Field(20, ge=2, le=200, description="Points of [0, 1] searched for the scale exponent alpha.")
    clip: bool = Field(True, description="Search a per-group weight clipping threshold as well.")
    round: bool = Field(False, description="Write the grid's rounded weights; default: scaled, rounded by the export.")

    def check(self, shape: ModelShape):
        problems, shape = super().check(shape)
        return problems + architecture_problems("awq", shape, FOLDABLE), shape

CLIP_TOKENS = 512  # tokens the clipping search looks at (evenly spaced), as AutoAWQ


def capture(layer, inputs: list) -> dict:
    """Inputs of the block's sub-modules while it runs: attention (with its kwargs), o_proj, mlp, down_proj."""
    got: dict = {"attn": [], "o": [], "mlp": [], "down": []}
    handles = []

    def keep(key, kwargs=False):
        def hook(m, args, kw=None):
            if kwargs:
                kw = dict(kw)
                got[key].append((args[0] if args else kw.pop("hidden_states"), kw))
            else:
                got[key].append(args[0])
        return hook

    handles.append(layer.self_attn.register_forward_pre_hook(keep("attn", True), with_kwargs=True))
    handles.append(layer.self_attn.o_proj.register_forward_pre_hook(keep("o")))
    handles.append(layer.mlp.register_forward_pre_hook(keep("mlp")))
    handles.append(layer.mlp.down_proj.register_forward_pre_hook(keep("down")))
    try:
        run_block(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return got


def scaling_groups(layer, got: dict) -> list:
    """(op before, linears, their inputs, the sub-module whose output the loss reads), in block order."""
    attn, mlp = layer.self_attn, layer.mlp
    kws = [kw for _, kw in got["attn"]]
    return [
        (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], [x for x, _ in got["attn"]],
         lambda i, x: attn(hidden_states=x, **kws[i])[0]),
        (attn.v_proj, [attn.o_proj], got["o"], lambda i, x: attn.o_proj(x)),
        (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], got["mlp"], lambda i, x: mlp(x)),
        (mlp.up_proj, [mlp.down_proj], got["down"], lambda i, x: mlp.down_proj(x)),
    ]


def search_scale(linears: list, xs: list, forward, grid: str, group_size: int, n_grid: int):
    """The s = mean|x|^α of the best α for these linears, and the loss at each α; `forward(i, x)` runs
    the sub-module whose output the loss compares on the i-th calibration batch."""
    import torch

    with torch.no_grad():
        x_mean = torch.cat([x.flatten(0, -2) for x in xs]).abs().mean(0)
        ref = [forward(i, x) for i, x in enumerate(xs)]
        orig = [lin.weight.data.clone() for lin in linears]
        best, best_s, losses = float("inf"), torch.ones_like(x_mean), []
        try:
            for alpha in np.linspace(0, 1, n_grid):
                s = x_mean.pow(float(alpha)).clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()
                for lin, w in zip(linears, orig):
                    lin.weight.data = rtn(w * s, grid, group_size) / s
                loss = sum(float((forward(i, x) - r).pow(2).mean()) for i, (x, r) in enumerate(zip(xs, ref))) / len(xs)
                losses.append(loss)
                if loss < best:
                    best, best_s = loss, s
        finally:
            for lin, w in zip(linears, orig):
                lin.weight.data = w
    return best_s, losses




def search_clip(lin, x, grid: str, group_size: int, n_grid: int = 20, max_shrink: float = 0.5) -> None:
    """Clip each group of weights at the threshold (1 down to 1 - max_shrink of its max) whose quantized
    output on these inputs is closest to the unclipped layer's, group by group."""
    import torch

    x = x.flatten(0, -2)
    x = x[torch.linspace(0, len(x) - 1, min(CLIP_TOKENS, len(x))).long()]
    w = lin.weight.data
    rows, cols = w.shape
    ng = cols // group_size
    wg = w.reshape(rows, ng, group_size)
    xg = x.reshape(-1, ng, group_size)
    ref = torch.einsum("tgk,ogk->tog", xg, wg)
    amax = wg.abs().amax(-1, keepdim=True)
    best_err = torch.full((rows, ng), float("inf"))
    best_max = amax.clone()
    for i in range(int(max_shrink * n_grid)):
        m = amax * (1 - i / n_grid)
        q = rtn(torch.maximum(torch.minimum(wg, m), -m).reshape(rows, cols), grid, group_size)
        err = (torch.einsum("tgk,ogk->tog", xg, q.reshape(rows, ng, group_size)) - ref).pow(2).mean(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better.unsqueeze(-1), m, best_max)
    lin.weight.data = torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(rows, cols)


def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict:
    import torch

    t0 = time.time()
    model = load(model_dir, threads)
    if model.config.model_type not in FOLDABLE:
        raise ValueError(f"awq: folds scales into Llama-style RMSNorm blocks ({', '.join(FOLDABLE)}); "
                         f"this model is '{model.config.model_type}'")
    grid, n_grid = opt.grid, opt.n_grid
    inputs = block_inputs(model, calibration_batches(calib, opt, "awq"))
    alphas, gains, skipped_vo = [], [], 0
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            gs = {lin: check_group(grid, opt.group_size, lin.in_features, "awq") for lin in linears}
            got = capture(layer, inputs)
            for prev, group, xs, forward in scaling_groups(layer, got):
                if prev is attn.v_proj and attn.v_proj.out_features != attn.o_proj.in_features:
                    skipped_vo += 1  # GQA: one v channel feeds several heads' o inputs; AWQ skips it too
                    continue
                s, losses = search_scale(group, xs, forward, grid, gs[group[0]], n_grid)
                fold(prev, group, s)
                alphas.append(float(np.linspace(0, 1, n_grid)[int(np.argmin(losses))]))
                gains.append(min(losses) / losses[0] if losses[0] > 0 else 1.0)
            if opt.clip:  # q/k are left alone, as AWQ does: the attention scores hide their error
                got = capture(layer, inputs)  # the inputs as scaled
                flat = {k: torch.cat([x if torch.is_tensor(x) else x[0] for x in v]).flatten(0, -2)
                        for k, v in got.items()}
                for lin, key in ((attn.v_proj, "attn"), (attn.o_proj, "o"), (mlp.gate_proj, "mlp"),
                                 (mlp.up_proj, "mlp"), (mlp.down_proj, "down")):
                    search_clip(lin, flat[key], grid, gs[lin])
            if opt.round:
                for lin in linears:
                    lin.weight.data = rtn(lin.weight.data, grid, gs[lin])
            inputs = run_block(layer, inputs)
    save_with_tokenizer(model, model_dir, out)
    return {"blocks": len(model.model.layers), "grid": grid, "alpha_mean": round(float(np.mean(alphas)), 3),
            "loss_ratio_to_rtn": round(float(np.mean(gains)), 4), "vo_skipped": skipped_vo,
            "clip": opt.clip, "rounded": opt.round, "seconds": round(time.time() - t0, 1)}
