"""Attention-head pruning: remove the least important query heads of every decoder block (and, if
asked, whole KV groups), giving a genuinely smaller dense model: fewer rows in q_proj, fewer columns in
o_proj, `num_attention_heads` lowered and `head_dim` written explicitly into the config (it is no
longer hidden_size / num_attention_heads).

Grouped-query attention stays consistent: query head i reads KV head i // group, so every KV group
keeps the same number of query heads (`heads_per_group`, or `ratio` of them removed, rounded) and the
kept heads stay in group order; `kv_heads` removes whole groups, their KV head with their query heads.

Importance of query head h, on the calibration tokens:
  activation  sum over tokens of || W_o[:, h] · a_h ||, the norm of the head's contribution to the block's
              output through o_proj (a_h: the head's attention output);
  gradient    sum over sequences of | sum over tokens and dims of a_h · dL/da_h |, the first-order
              change of the next-token loss when the head is masked (Michel et al., 2019).
A KV group's importance is the sum of its query heads'.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from farm.compress.common import Calibrated, calibration_batches, load, run_hooked, save_with_tokenizer
from farm.inputs.modelref import ModelShape
from farm.plugin import FractionGrid, PositiveGrid, as_list


def kept_per_group(group: int, ratio: float) -> int:
    return group - math.floor(group * ratio + 0.5)


class Options(Calibrated):
    """Removes the least important query heads of every KV group (and whole groups with kv_heads)."""
    TAGS = {"heads_per_group": "hpg{heads_per_group}", "ratio": "{ratio}", "kv_heads": "kv{kv_heads}",
            "importance": "{importance}"}
    GRID = ("heads_per_group", "ratio", "kv_heads")
    method: Literal["prune_heads"]
    heads_per_group: PositiveGrid | None = Field(
        None, description="Query heads each KV group keeps (1 .. fewer than now); a list is a grid.")
    ratio: FractionGrid | None = Field(
        None, description="Or: share of each KV group's query heads to remove (rounded); a list is a grid.")
    kv_heads: PositiveGrid | None = Field(
        None, description="KV groups to keep (fewer than now); the least important go with their query heads.")
    importance: Literal["activation", "gradient"] = Field(
        "activation", description="activation: norm of each head's output through o_proj; gradient: |a·dL/da|.")

    @model_validator(mode="after")
    def _one_amount(self):
        if self.heads_per_group is not None and self.ratio is not None:
            raise ValueError("ratio: give heads_per_group or ratio, not both")
        if self.heads_per_group is None and self.ratio is None and self.kv_heads is None:
            raise ValueError("heads_per_group: say how many heads to keep (heads_per_group, ratio or kv_heads)")
        return self

    def check(self, shape: ModelShape):
        """The same arithmetic as `plan`, for every value of a grid; the shape leaving is the largest."""
        heads, n_kv = shape.heads, shape.kv_heads
        if not (heads and n_kv and heads % n_kv == 0):
            return [], shape
        group, problems = heads // n_kv, []
        entering = f"the model entering this step has {heads} query heads in {n_kv} KV group(s) of {group}"
        kv_values = as_list(self.kv_heads) if self.kv_heads is not None else []
        bad_kv = [k for k in kv_values if not 1 <= k < n_kv]
        if bad_kv:
            use = f"use 1..{n_kv - 1}" if n_kv > 1 else "it has only one"
            problems.append(f"kv_heads: {bad_kv} would not remove a KV group ({entering}); {use}")
        field, keep_of = "", {}
        if self.heads_per_group is not None:
            field, keep_of = "heads_per_group", {k: k for k in as_list(self.heads_per_group)}
        elif self.ratio is not None:
            field, keep_of = "ratio", {r: kept_per_group(group, r) for r in as_list(self.ratio)}
        bad = [v for v, k in keep_of.items() if not 1 <= k < group]
        if bad:
            use = f"keep 1..{group - 1} per group" if group > 1 else "use kv_heads to remove whole groups"
            problems.append(f"{field}: {bad} must remove some but not all of each KV group's query heads "
                            f"({entering}); {use}")
        new_kv = max([k for k in kv_values if 1 <= k < n_kv], default=n_kv)
        keeps = [k for k in keep_of.values() if 1 <= k < group]
        return problems, shape.but(kv_heads=new_kv, heads=new_kv * max(keeps, default=group))


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def head_importance(model, batches: list, how: str = "activation") -> list:
    """One tensor [num_attention_heads] per decoder block."""
    import torch

    cfg = model.config
    heads, d = cfg.num_attention_heads, head_dim_of(cfg)
    scores = [torch.zeros(heads, dtype=torch.float64) for _ in model.model.layers]
    handles = []
    for i, layer in enumerate(model.model.layers):
        o_proj = layer.self_attn.o_proj

        def hook(module, args, i=i, o_proj=o_proj):
            a = args[0]  # [batch, tokens, heads * head_dim], the input of o_proj
            if how == "activation":
                w = o_proj.weight.detach().float().view(-1, heads, d)
                per_head = torch.einsum("nhd,ohd->nho", a.detach().float().reshape(-1, heads, d), w)
                scores[i] += per_head.norm(dim=-1).sum(0).double()
            else:
                act = a.detach()

                def grad_hook(g, act=act, i=i):
                    prod = (act.float() * g.float()).view(act.shape[0], -1, heads, d).sum((1, 3))  # [batch, heads]
                    scores[i] += prod.abs().sum(0).double()
                a.register_hook(grad_hook)
        handles.append(o_proj.register_forward_pre_hook(hook))
    if how == "activation":
        run_hooked(model, batches, handles)
    else:
        try:
            with torch.enable_grad():
                for ids in batches:
                    logits = model(ids, use_cache=False).logits
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                    loss.backward()
                    model.zero_grad(set_to_none=True)
        finally:
            for h in handles:
                h.remove()
    return scores


def keep_heads(score, n_kv: int, kv_keep: int, per_group: int) -> tuple[list[int], list[int]]:
    """(query heads, KV heads) to keep in one block, in their original order."""
    import torch

    group = score.numel() // n_kv
    by_group = score.view(n_kv, group)
    kv = sorted(torch.topk(by_group.sum(1), kv_keep).indices.tolist())
    q = [g * group + int(j) for g in kv for j in sorted(torch.topk(by_group[g], per_group).indices.tolist())]
    return q, kv


def slice_heads(linear, heads: list[int], head_dim: int, dim: int):
    """A Linear keeping the given heads' rows (dim 0: q/k/v_proj) or columns (dim 1: o_proj)."""
    import torch

    idx = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
    w = linear.weight.data.index_select(dim, idx)
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype)
    new.weight.data.copy_(w)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.data[idx] if dim == 0 else linear.bias.data)
    return new


def plan(heads: int, n_kv: int, opt: Options) -> tuple[int, int]:
    """(KV heads to keep, query heads to keep per group), checked against the model's shape."""
    group = heads // n_kv
    kv_keep = int(opt.kv_heads or n_kv)
    if opt.heads_per_group is not None:
        per_group, field = int(opt.heads_per_group), "heads_per_group"
    elif opt.ratio is not None:
        per_group, field = kept_per_group(group, float(opt.ratio)), "ratio"
    else:
        per_group, field = group, "kv_heads"
    if not 1 <= kv_keep <= n_kv:
        raise ValueError(f"prune_heads.kv_heads={kv_keep}: the model has {n_kv} KV heads; keep 1..{n_kv - 1}")
    if not 1 <= per_group <= group:
        raise ValueError(f"prune_heads.{field}={getattr(opt, field)}: keeps {per_group} of the {group} query heads per "
                         f"KV group; keep 1..{group - 1}")
    if (kv_keep, per_group) == (n_kv, group):
        raise ValueError(f"prune_heads.{field}={getattr(opt, field)}: removes no head (the model has {n_kv} KV groups "
                         f"of {group} query heads)")
    return kv_keep, per_group


def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict:
    model = load(model_dir, threads)
    cfg = model.config
    heads, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim_of(cfg)
    kv_keep, per_group = plan(heads, n_kv, opt)
    how = opt.importance
    scores = head_importance(model, calibration_batches(calib, opt, "prune_heads"), how)
    kept = []
    for layer, score in zip(model.model.layers, scores):
        q, kv = keep_heads(score, n_kv, kv_keep, per_group)
        attn = layer.self_attn
        attn.q_proj = slice_heads(attn.q_proj, q, d, 0)
        attn.o_proj = slice_heads(attn.o_proj, q, d, 1)
        if len(kv) < n_kv:
            attn.k_proj = slice_heads(attn.k_proj, kv, d, 0)
            attn.v_proj = slice_heads(attn.v_proj, kv, d, 0)
        attn.num_key_value_groups = per_group
        kept.append(q)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = kv_keep * per_group, kv_keep, d
    save_with_tokenizer(model, model_dir, out)
    return {"heads_before": heads, "heads_after": kv_keep * per_group, "kv_heads_before": n_kv,
            "kv_heads_after": kv_keep, "head_dim": d, "importance": how, "kept_heads": kept,
            "head_scores": [[round(float(x), 4) for x in s / s.sum()] for s in scores],
            "params_after": sum(p.numel() for p in model.parameters())}
