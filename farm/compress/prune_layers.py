"""Structured layer pruning by block influence (ShortGPT, Men et al. 2024).

Each decoder block's influence is 1 - mean cosine similarity between the hidden state entering it
and the hidden state leaving it, over calibration tokens. The `drop` blocks with the lowest influence
change the residual stream least and are removed; the result is a genuinely smaller dense model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np


def run_hooked(model, batches: list, handles: list) -> None:
    """Run the calibration batches through the model, then remove the hooks that watched them."""
    import torch

    try:
        with torch.inference_mode():
            for ids in batches:
                model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()


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


def drop_layers(model, drop: list[int]) -> None:
    import torch

    keep = [layer for i, layer in enumerate(model.model.layers) if i not in set(drop)]
    for new_idx, layer in enumerate(keep):
        layer.self_attn.layer_idx = new_idx
    model.model.layers = torch.nn.ModuleList(keep)
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in set(drop)]


def save_with_tokenizer(model, model_dir: Path, out: Path) -> None:
    """Save safetensors weights and config; the tokenizer and chat template travel with the model."""
    model.save_pretrained(out, safe_serialization=True)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, out / f.name)


def apply(model_dir: Path, step: dict, calib: np.ndarray, out: Path, threads: int) -> dict:
    import torch

    from farm.models import load_model

    torch.set_num_threads(threads)
    model = load_model(model_dir)
    n_layers = len(model.model.layers)
    k = int(step["drop"])
    if not 1 <= k < n_layers:
        raise ValueError(f"prune_layers.drop={k}: the model has {n_layers} blocks; drop 1..{n_layers - 1}")
    seq = step["seq_len"]
    n = min(step["calib_samples"], len(calib) // seq)
    if n < 1:
        raise ValueError(f"prune_layers: need {seq} calibration tokens, have {len(calib)} — raise data.calib_tokens")
    batches = [torch.tensor(calib[i * seq:(i + 1) * seq]).unsqueeze(0) for i in range(n)]
    scores = block_influence(model, batches)
    drop = sorted(np.argsort(scores)[:k].tolist())
    drop_layers(model, drop)
    save_with_tokenizer(model, model_dir, out)
    return {"dropped_layers": drop, "block_influence": [round(s, 5) for s in scores],
            "layers_before": n_layers, "layers_after": n_layers - k}
