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

import numpy as np

from farm.compress.prune_layers import run_hooked, save_with_tokenizer


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


def plan(heads: int, n_kv: int, step: dict) -> tuple[int, int]:
    """(KV heads to keep, query heads to keep per group), checked against the model's shape."""
    group = heads // n_kv
    kv_keep = int(step.get("kv_heads") or n_kv)
    if step.get("heads_per_group") is not None:
        per_group, field = int(step["heads_per_group"]), "heads_per_group"
    elif step.get("ratio") is not None:
        per_group, field = group - math.floor(group * float(step["ratio"]) + 0.5), "ratio"
    else:
        per_group, field = group, "kv_heads"
    if not 1 <= kv_keep <= n_kv:
        raise ValueError(f"prune_heads.kv_heads={kv_keep}: the model has {n_kv} KV heads; keep 1..{n_kv - 1}")
    if not 1 <= per_group <= group:
        raise ValueError(f"prune_heads.{field}={step.get(field)}: keeps {per_group} of the {group} query heads per "
                         f"KV group; keep 1..{group - 1}")
    if (kv_keep, per_group) == (n_kv, group):
        raise ValueError(f"prune_heads.{field}={step.get(field)}: removes no head (the model has {n_kv} KV groups "
                         f"of {group} query heads)")
    return kv_keep, per_group


def apply(model_dir: Path, step: dict, calib: np.ndarray, out: Path, threads: int) -> dict:
    import torch

    from farm.models import load_model

    torch.set_num_threads(threads)
    model = load_model(model_dir)
    cfg = model.config
    heads, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim_of(cfg)
    kv_keep, per_group = plan(heads, n_kv, step)
    seq = step["seq_len"]
    n = min(step["calib_samples"], len(calib) // seq)
    if n < 1:
        raise ValueError(f"prune_heads: need {seq} calibration tokens, have {len(calib)} — raise data.calib_tokens")
    how = step.get("importance", "activation")
    scores = head_importance(model, [torch.tensor(calib[i * seq:(i + 1) * seq]).unsqueeze(0) for i in range(n)], how)
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
