"""GPTQ post-training quantization (Frantar et al., 2022), written out in torch on the model's weights.

Block by block, in order: the calibration tokens run through the blocks already quantized, and inside
a block the linear layers are taken in the order they compute (q/k/v, o, gate/up, down), each seeing
inputs that have passed through its quantized predecessors. For a layer with inputs X (n tokens):

  H = 2 XᵀX / n + damp·I          damp = percdamp × mean(diag H)
  U = chol(H⁻¹)ᵀ (upper)          then for each input column j, left to right (or by decreasing diag H
                                  with act_order): q_j = Q(w_j); the rows' error (w_j - q_j) / U_jj is
                                  spread over the columns not yet quantized by U_j,j+1:, the updates
                                  applied lazily in blocks of `block_size` columns.

Q is the quantization grid, one scale per `group_size` consecutive inputs of a row:
  q4_0  llama.cpp's Q4_0, exactly: groups of 32, d = (the signed value of largest |x|) / -8,
        q = min(15, floor(x/d + 8.5)), value = fp16(d)·(q - 8). The weight that sets a group's scale is
        kept at q = 0 (value -8·d), so llama.cpp's own Q4_0 quantizer, run by the GGUF exporter on
        these weights, finds the same scale and the same q: the export reproduces them exactly.
  sym   int4, scale 2·max|x|/15, zero point 8 (GPTQ's symmetric grid)
  asym  int4, scale (max - min)/15 over a range that holds 0, a rounded zero point
Other runtimes' int4 quantizers (ONNX Runtime, OpenVINO) re-quantize sym/asym weights on their own
scales, so part of GPTQ's gain can be lost there; q4_0 into GGUF Q4_0 loses nothing.

The result is a float Hugging Face checkpoint of the de-quantized weights ("fake-quantized"), which
every exporter and the PyTorch runtime read like any other model. Embeddings and lm_head are left to the
exporter. `awq` uses this module's grid and block plumbing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from farm.compress.common import (
    Q4_0_GROUP,
    QuantGrid,
    Stop,
    block_inputs,
    calibration_batches,
    check_group,
    fake_quant,
    grid_params,
    load,
    rtn,
    run_block,
    save_with_tokenizer,
)

__all__ = ["Options", "apply", "gptq", "rtn"]


class Options(QuantGrid):
    method: Literal["gptq"]
    act_order: bool = Field(False, description="Quantize columns by decreasing Hessian diagonal.")
    percdamp: float = Field(0.01, gt=0, le=1, description="Dampening added to the Hessian: this x mean(diag).")
    block_size: int = Field(128, ge=1, le=8192, description="Columns per lazy batch update.")

# the linear layers of a Llama-style block in the order they compute; others go last, together
SEQUENTIAL = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))










# ---- GPTQ on one layer ----------------------------------------------------------------------------
def gptq(w, h, grid: str = "q4_0", group_size: int = 32, block_size: int = 128, percdamp: float = 0.01,
         act_order: bool = False):
    """GPTQ of one weight matrix w [out, in] given H = 2XᵀX/n [in, in]; returns the de-quantized weights."""
    import torch

    w = w.detach().float().clone()
    h = h.detach().float().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    ng = cols // group_size
    static = act_order  # with act_order, groups are not visited in order: their scales come first
    scale = torch.zeros(rows, ng)
    zero = torch.zeros(rows, ng)
    anchor = torch.full((rows, ng), -1, dtype=torch.long)  # q4_0: column (in group) that set the scale
    if static:
        g = w.reshape(rows, ng, group_size)
        s, z = grid_params(g.reshape(-1, group_size), grid)
        scale, zero = s.reshape(rows, ng), z.reshape(rows, ng)
        anchor = g.abs().argmax(-1)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(cols)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    block = max(block_size, group_size) // group_size * group_size  # a group never straddles two blocks
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # the column's place in the original layout decides its group
            gi, off = divmod(col, group_size)
            if not static and off == 0:  # not permuted: the group starts here, its columns are w1[:, i:]
                grp = w1[:, i:i + group_size]
                s, z = grid_params(grp, grid)
                scale[:, gi], zero[:, gi] = s[:, 0], z[:, 0]
                anchor[:, gi] = grp.abs().argmax(1)
            s, z = scale[:, gi:gi + 1], zero[:, gi:gi + 1]
            qc = fake_quant(w1[:, i:i + 1], s, z, grid)[:, 0]
            if grid == "q4_0":  # the scale-setting weight stays at q = 0, so a re-quantization finds d
                qc = torch.where(anchor[:, gi] == off, -8 * s[:, 0].half().float(), qc)
            q[:, i1 + i] = qc
            e = (w1[:, i] - qc) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return q[:, torch.argsort(perm)]


def output_error(w, q, h) -> float:
    """||XWᵀ - XQᵀ||² / ||XWᵀ||², from H = 2XᵀX/n."""
    e = (w - q).float()
    return float((e @ h * e).sum() / (w.float() @ h * w.float()).sum().clamp(min=1e-30))








def linear_groups(layer) -> list[list[str]]:
    import torch

    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    groups = [[n for n in g if n in names] for g in SEQUENTIAL]
    rest = [n for n in names if not any(n in g for g in groups)]
    return [g for g in groups if g] + ([rest] if rest else [])


def hessians(layer, names: list[str], inputs: list) -> dict:
    """H = 2XᵀX/n of each named linear's inputs while the block runs on `inputs`. Linears fed the same
    tensor (q/k/v, gate/up) share one XᵀX; the block stops once every named linear has seen its input."""
    import torch

    mods = dict(layer.named_modules())
    acc = {n: [0, 0] for n in names}
    seen: dict = {}  # this batch: name -> XᵀX of its input
    handles = []
    for n in names:
        def hook(m, args, n=n):
            x = args[0].detach()
            same = [xtx for other, (ref, xtx) in seen.items() if ref is x]
            x = x.float().flatten(0, -2)
            xtx = same[0] if same else x.T @ x
            seen[n] = (args[0], xtx)
            acc[n][0] = acc[n][0] + xtx
            acc[n][1] += x.shape[0]
            if len(seen) == len(names):
                raise Stop
        handles.append(mods[n].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for hidden, kw in inputs:
                seen.clear()
                try:
                    layer(hidden, **kw)
                except Stop:
                    pass
    finally:
        for hd in handles:
            hd.remove()
    return {n: 2 * s / k for n, (s, k) in acc.items()}




def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict:

    t0 = time.time()
    model = load(model_dir, threads)
    grid = opt.grid
    inputs = block_inputs(model, calibration_batches(calib, opt, "gptq"))
    errs, errs_rtn = [], []
    for layer in model.model.layers:
        mods = dict(layer.named_modules())
        for names in linear_groups(layer):
            hs = hessians(layer, names, inputs)  # through the quantized layers of this block so far
            for n in names:
                lin = mods[n]
                w = lin.weight.data
                gs = check_group(grid, opt.group_size, w.shape[1], "gptq")
                q = gptq(w, hs[n], grid, gs, opt.block_size, opt.percdamp, opt.act_order)
                errs.append(output_error(w, q, hs[n]))
                errs_rtn.append(output_error(w, rtn(w, grid, gs), hs[n]))
                lin.weight.data.copy_(q.to(w.dtype))
        inputs = run_block(layer, inputs)  # the next block sees this one quantized
    save_with_tokenizer(model, model_dir, out)
    return {"layers_quantized": len(errs), "grid": grid,
            "group_size": Q4_0_GROUP if grid == "q4_0" else opt.group_size,
            "rel_error_gptq": round(float(np.mean(errs)), 6), "rel_error_rtn": round(float(np.mean(errs_rtn)), 6),
            "seconds": round(time.time() - t0, 1)}
