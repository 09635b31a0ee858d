"""Movement pruning (Sanh, Wolf & Rush, 2020): learn what to remove while fine-tuning, instead of scoring
once. Every prunable unit gets a score S, trained beside the weights; the forward pass uses the weights
times a mask that keeps the top-scored units (hard movement pruning, Top-v), and the mask passes its
gradient straight through to the scores, so dL/dS = dL/dW' * W summed over the unit: a unit whose weights
move away from zero gains score, one moving towards zero loses it. The share masked rises from 0 to
`sparsity` along a cubic schedule over the first `ramp` of the steps, then stays (the paper's schedule).

target    weights  each weight of the decoder blocks' linear layers (Top-v per matrix); the model stays
                   dense with zeros, like `sparsify` — quality, no speed, on the CPU runtimes;
          mlp      each intermediate channel of every block's gated MLP (a column of down_proj; Lagunas et
                   al., 2021, "Block pruning"): the kept channels become a smaller dense MLP (prune_mlp.shrink);
          heads    each query head, the same number kept in every KV group (columns of o_proj): the kept
                   heads become a smaller attention (prune_heads.slice_heads).
The loss is that of `distill`/`lora` (farm/compress/kd.py): KD from the model entering the step, which is
the teacher, plus cross-entropy by `kd_weight`; `teacher: false` trains on the text alone. Scores start at
zero (all units equal) and learn at `score_lr`; the weights learn at `lr`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from farm.compress.common import Training, load, save_with_tokenizer
from farm.compress.kd import ce_loss, kd_loss, windows
from farm.compress.prune_heads import head_dim_of, kept_per_group, slice_heads
from farm.compress.prune_mlp import kept_width, shrink
from farm.inputs.modelref import ModelShape
from farm.plugin import FractionGrid, architecture_problems, as_list

# decoder blocks at model.model.layers with a gated MLP (gate/up/down_proj) and q/k/v/o_proj attention
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class Options(Training):
    """Learns scores for weights, MLP channels or heads during a short KD fine-tuning; removes the lowest."""
    LABEL = "{target}-{sparsity}"
    GRID = ("sparsity",)
    TAGS = {"kd_weight": "kd{kd_weight}", "steps": "s{steps}"}
    method: Literal["movement_pruning"]
    target: Literal["weights", "mlp", "heads"] = Field(
        "mlp", description="weights: single weights (stays dense with zeros); mlp: MLP channels; heads: query "
        "heads (both give a smaller dense model).")
    sparsity: FractionGrid = Field(..., description="Share of the units removed (per matrix, per block's MLP, per "
                                   "KV group's heads); a list is a grid.")
    lr: float = Field(3e-5, gt=0, le=1, description="Learning rate of the weights.")
    score_lr: float = Field(1e-2, gt=0, le=10, description="Learning rate of the scores (the paper: 1e-2).")
    ramp: float = Field(0.67, gt=0, le=1, description="Share of the steps over which the masked share rises "
                        "(cubic) to `sparsity`; the rest train at `sparsity`.")
    multiple_of: int = Field(64, ge=1, le=4096, description="mlp: the kept width is a multiple of this.")

    def check(self, shape: ModelShape):
        values, problems = as_list(self.sparsity), architecture_problems("movement_pruning", shape, SUPPORTED)
        if self.target == "mlp" and shape.intermediate:
            kept = {s: kept_width(shape.intermediate, s, self.multiple_of) for s in values}
            if bad := [s for s, k in kept.items() if k >= shape.intermediate]:
                problems.append(f"sparsity: {bad} keeps all {shape.intermediate} MLP channels at multiples of "
                                f"{self.multiple_of}; raise sparsity or lower multiple_of")
            return problems, shape.but(intermediate=max(kept.values()))
        if self.target == "heads" and shape.heads and shape.kv_heads and shape.heads % shape.kv_heads == 0:
            group = shape.heads // shape.kv_heads
            kept = {s: kept_per_group(group, s) for s in values}
            if bad := [s for s, k in kept.items() if not 1 <= k < group]:
                problems.append(f"sparsity: {bad} must remove some but not all of each KV group's {group} query "
                                f"heads (the model entering this step has {shape.heads} in {shape.kv_heads} groups)")
            return problems, shape.but(heads=shape.kv_heads * max(kept.values()))
        return problems, shape


def schedule(step: int, steps: int, sparsity: float, ramp: float) -> float:
    """The share masked at `step` (0-based): cubic from 0 to `sparsity` over the first `ramp` of the steps."""
    end = max(1, round(steps * ramp))
    return sparsity if step >= end else sparsity * (1 - (1 - step / end) ** 3)


def mask_module(scores, keep, expand):
    """A weight parametrization: W * expand(keep(scores, share)), the 0/1 mask's gradient passed straight
    through to the scores. `keep` gives the mask; `expand` maps it onto the weight's shape."""
    import torch

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scores = torch.nn.Parameter(scores)
            self.share = 0.0

        def forward(self, w):
            s = self.scores
            hard = keep(s.detach(), self.share).to(s.dtype)
            return w * expand(hard + s - s.detach())  # forward: the 0/1 mask; backward: identity to s
    return Masked()


def keep_top(scores, share: float):
    """True for all but the lowest-scored `share` of the entries (ties keep the earlier index)."""
    import torch

    n = scores.numel()
    k = n - round(n * share)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return flat.view_as(scores)


def units(model, opt: Options) -> list:
    """(module, weight's parametrization spec) per prunable place: (linear, scores, keep, expand)."""
    import torch

    cfg, out = model.config, []
    for layer in model.model.layers:
        if opt.target == "weights":
            for lin in layer.modules():
                if isinstance(lin, torch.nn.Linear):
                    out.append((lin, torch.zeros_like(lin.weight), keep_top, lambda m: m))
        elif opt.target == "mlp":
            down = layer.mlp.down_proj
            out.append((down, torch.zeros(down.in_features), keep_top, lambda m: m[None, :]))
        else:
            heads, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim_of(cfg)

            def per_group(s, share, n_kv=n_kv):
                return torch.stack([keep_top(g, share) for g in s.view(n_kv, -1)]).flatten()
            out.append((layer.self_attn.o_proj, torch.zeros(heads), per_group,
                        lambda m, d=d: m.repeat_interleave(d)[None, :]))
    return out


def masked_share(opt: Options, model) -> float:
    """The share the final mask removes, in the units' own rounding (kept_width / kept_per_group)."""
    cfg = model.config
    if opt.target == "mlp":
        return 1 - kept_width(cfg.intermediate_size, opt.sparsity, opt.multiple_of) / cfg.intermediate_size
    if opt.target == "heads":
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        return 1 - kept_per_group(group, opt.sparsity) / group
    return float(opt.sparsity)


def train(student, teacher, calib: np.ndarray, opt: Options) -> tuple[list, dict]:
    """Fine-tune `student` with learned masks; returns the parametrized places and the loss summary."""
    import torch
    from torch.nn.utils import parametrize

    places = units(student, opt)
    masks = []
    for lin, scores, keep, expand in places:
        parametrize.register_parametrization(lin, "weight", mask_module(scores, keep, expand), unsafe=True)
        masks.append(lin.parametrizations.weight[0])
    score_params = [m.scores for m in masks]
    ids_of = {id(p) for p in score_params}
    weights = [p for p in student.parameters() if p.requires_grad and id(p) not in ids_of]
    optim = torch.optim.AdamW([{"params": weights, "lr": opt.lr}, {"params": score_params, "lr": opt.score_lr}],
                              weight_decay=0.0)
    final, kd_w = masked_share(opt, student), (opt.kd_weight if teacher is not None else 0.0)
    losses, t0 = [], time.time()
    student.train()
    for i, ids in enumerate(windows(calib, opt.seq_len, opt.batch, opt.steps, seed=opt.seed)):
        for m in masks:
            m.share = schedule(i, opt.steps, final, opt.ramp)
        logits = student(ids, use_cache=False).logits
        loss = (1 - kd_w) * ce_loss(logits, ids) if kd_w < 1 else 0.0
        if teacher is not None:
            with torch.no_grad():
                ref = teacher(ids, use_cache=False).logits
            loss = loss + kd_w * kd_loss(logits, ref, opt.temperature)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    for m in masks:
        m.share = final
    student.eval()
    tail = max(1, len(losses) // 10)
    return places, {"steps": len(losses), "loss_first": round(losses[0], 4),
                    "loss_last": round(float(np.mean(losses[-tail:])), 4), "train_seconds": round(time.time() - t0, 1),
                    "objective": "kd" if teacher is not None else "ce"}


def finalize(model, places: list, opt: Options) -> dict:
    """Bake the final masks: zeros for weights; kept MLP channels or heads sliced into a smaller dense model."""
    import torch
    from torch.nn.utils import parametrize

    keeps = [keep(lin.parametrizations.weight[0].scores.detach(), lin.parametrizations.weight[0].share)
             for lin, _, keep, _ in places]
    for lin, *_ in places:
        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    cfg = model.config
    if opt.target == "weights":
        zeros = sum(int((lin.weight == 0).sum()) for lin, *_ in places)
        return {"sparsity_achieved": round(zeros / sum(lin.weight.numel() for lin, *_ in places), 4)}
    if opt.target == "mlp":
        width = cfg.intermediate_size
        for layer, kept in zip(model.model.layers, keeps):
            shrink(layer.mlp, torch.nonzero(kept).flatten())
        cfg.intermediate_size = int(keeps[0].sum())
        return {"intermediate_before": width, "intermediate_after": cfg.intermediate_size}
    heads, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim_of(cfg)
    kept_heads = []
    for layer, kept in zip(model.model.layers, keeps):
        q = torch.nonzero(kept).flatten().tolist()
        attn = layer.self_attn
        attn.q_proj, attn.o_proj = slice_heads(attn.q_proj, q, d, 0), slice_heads(attn.o_proj, q, d, 1)
        attn.num_key_value_groups = len(q) // n_kv
        kept_heads.append(q)
    cfg.num_attention_heads, cfg.head_dim = len(kept_heads[0]), d
    return {"heads_before": heads, "heads_after": cfg.num_attention_heads, "kept_heads": kept_heads}


def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict:
    import torch

    torch.manual_seed(opt.seed)
    student = load(model_dir, threads)
    teacher = None
    if opt.teacher:
        teacher = load(model_dir, threads).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    places, info = train(student, teacher, calib, opt)
    info.update(finalize(student, places, opt))
    save_with_tokenizer(student, model_dir, out)
    return {**info, "target": opt.target, "params_after": sum(p.numel() for p in student.parameters())}
