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

import numpy as np

from farm.compress.prune_layers import run_hooked, save_with_tokenizer


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


def apply(model_dir: Path, step: dict, calib: np.ndarray, out: Path, threads: int) -> dict:
    import torch

    from farm.models import load_model

    torch.set_num_threads(threads)
    model = load_model(model_dir)
    norms = {}
    if step["criterion"] == "wanda":
        seq = step["seq_len"]
        n = min(step["calib_samples"], len(calib) // seq)
        if n < 1:
            raise ValueError(f"sparsify: need {seq} calibration tokens, have {len(calib)} — raise data.calib_tokens")
        norms = input_norms(model, [torch.tensor(calib[i * seq:(i + 1) * seq]).unsqueeze(0) for i in range(n)])
    zeros = total = 0
    with torch.no_grad():
        for name, mod in model.model.layers.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            w = mod.weight.data
            score = w.abs() * norms[name].to(w.dtype) if norms else w.abs()
            w.mul_(mask(score, step["sparsity"], step["pattern"]).to(w.dtype))
            zeros += int((w == 0).sum())
            total += w.numel()
    save_with_tokenizer(model, model_dir, out)
    return {"sparsity_achieved": round(zeros / total, 4), "weights_in_scope": total}
