"""Grouped-query attention by mean pooling (Ainslie et al., 2023): merge groups of neighbouring key/value
heads into one head whose projection is the mean of theirs, e.g. the embedded model's 3 KV heads into 1
(multi-query attention). The KV cache shrinks by the same factor; a `lora` step after it can heal.
Query heads keep their projections: query head i already read KV head i // (heads / kv_heads), and the
merged groups are contiguous, so it now reads merged head i // (heads / new_kv_heads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from farm.compress.common import load, save_with_tokenizer
from farm.inputs.modelref import ModelShape
from farm.plugin import PositiveGrid, StepOptions, as_list


class Options(StepOptions):
    LABEL = "kv{kv_heads}"
    GRID = ("kv_heads",)
    method: Literal["gqa"]
    kv_heads: PositiveGrid = Field(..., description="KV heads after mean-pooling (a divisor of the current).")

    def check(self, shape: ModelShape):
        n_kv = shape.kv_heads
        if n_kv is None:
            return [], shape
        fits = [k for k in as_list(self.kv_heads) if k < n_kv and n_kv % k == 0]
        bad = [k for k in as_list(self.kv_heads) if k not in fits]
        problems = [f"kv_heads: {bad} is not a proper divisor of the model's {n_kv} KV heads; use one of "
                    f"{[k for k in range(1, n_kv) if n_kv % k == 0]}"] if bad else []
        return problems, shape.but(kv_heads=max(fits, default=n_kv))


def kv_cache_bytes_per_token(config, kv_heads: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for one token, at fp16 unless told."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * bytes_per_value


def merge_heads(linear, n_kv: int, target: int, head_dim: int):
    """A Linear projecting to n_kv heads -> one projecting to `target` heads, each the mean of its group."""
    import torch

    group = n_kv // target
    w = linear.weight.data.view(target, group, head_dim, -1).mean(1).reshape(target * head_dim, -1)
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype)
    new.weight.data.copy_(w)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data.view(target, group, head_dim).mean(1).reshape(-1))
    return new


def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict:
    model = load(model_dir, threads)
    cfg = model.config
    heads, n_kv, target = cfg.num_attention_heads, cfg.num_key_value_heads, int(opt.kv_heads)
    if not (target < n_kv and n_kv % target == 0):
        raise ValueError(f"gqa.kv_heads={target}: the model has {n_kv} KV heads; use a proper divisor of {n_kv}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.k_proj = merge_heads(attn.k_proj, n_kv, target, head_dim)
        attn.v_proj = merge_heads(attn.v_proj, n_kv, target, head_dim)
        attn.num_key_value_groups = heads // target
    before = kv_cache_bytes_per_token(cfg, n_kv)
    cfg.num_key_value_heads = target
    save_with_tokenizer(model, model_dir, out)
    return {"kv_heads_before": n_kv, "kv_heads_after": target, "kv_cache_bytes_per_token_fp16_before": before,
            "kv_cache_bytes_per_token_fp16_after": kv_cache_bytes_per_token(cfg, target)}
