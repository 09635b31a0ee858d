"""Training shared by the methods that learn (distill, lora): calibration windows, the distillation
loss, one small AdamW loop on the CPU.

Loss = kd_weight * T^2 * KL(teacher_T || student_T)            (forward KL, temperature-softened)
     + (1 - kd_weight) * cross-entropy on the next token         (the data's own labels)
     + hidden_weight * mean ||h_s - h_t||^2 / ||h_t||^2          (hidden states of paired layers)
     + attention_weight * mean KL(A_t || A_s)                      (attention maps of paired layers, MiniLM)
Without a teacher (`teacher: false`, the control run) the loss is the cross-entropy alone.

Sequence-level KD (Kim & Rush, 2016): `continuations` lets the teacher write text of its own from
calibration prompts; those windows join the calibration windows the loop samples from.

On-policy reverse KL (MiniLLM, farm/compress/reverse_kl.py) replaces the whole loss by its own: `train`
takes it as `on_policy`, an object whose loss(student, ids) a step calls in place of the terms above.
"""

from __future__ import annotations

import time

import numpy as np


def windows(calib: np.ndarray, seq_len: int, batch: int, steps: int, seed: int = 0, extra: np.ndarray | None = None):
    """`steps` batches of random calibration windows; the same for every run with the same seed.

    `extra` [n, seq_len]: more windows (the teacher's continuations). They join the pool of
    len(calib) // seq_len calibration windows: each window of a batch is one of them with probability
    n / (n + len(calib) // seq_len)."""
    import torch

    if len(calib) < seq_len + 1:
        raise ValueError(f"need at least {seq_len + 1} calibration tokens, have {len(calib)} — raise data.calib_tokens")
    rng = np.random.default_rng(seed)
    share = len(extra) / (len(extra) + len(calib) // seq_len) if extra is not None and len(extra) else 0.0
    for _ in range(steps):
        starts = rng.integers(0, len(calib) - seq_len, size=batch)
        rows = [calib[s:s + seq_len] for s in starts]
        if share:
            pick = rng.random(batch) < share
            rows = [extra[rng.integers(len(extra))] if p else r for p, r in zip(pick, rows)]
        yield torch.tensor(np.stack(rows), dtype=torch.long)


def continuations(teacher, calib: np.ndarray, n: int, seq_len: int, temperature: float = 0.0, seed: int = 0,
                  batch: int = 8) -> np.ndarray:
    """[n, seq_len] windows: the first seq_len // 2 tokens from the calibration text (random starts), the
    rest written by the teacher — greedy at temperature 0, else sampled (seeded) at that temperature."""
    import torch

    prompt_len = seq_len // 2
    if len(calib) < prompt_len + 1:
        raise ValueError(f"need at least {prompt_len + 1} calibration tokens for continuation prompts")
    rng = np.random.default_rng(seed + 1)  # not the stream of the training windows
    gen = torch.Generator().manual_seed(seed)
    starts = rng.integers(0, len(calib) - prompt_len, size=n)
    out = []
    teacher.eval()
    with torch.inference_mode():
        for b in range(0, n, batch):
            ids = torch.tensor(np.stack([calib[s:s + prompt_len] for s in starts[b:b + batch]]), dtype=torch.long)
            out.append(sample(teacher, ids, seq_len - prompt_len, temperature, gen).numpy())
    return np.concatenate(out).astype(np.int64)


def sample(model, ids, new_tokens: int, temperature: float, generator):
    """ids [batch, p] -> [batch, p + new_tokens], continued by `model` with its KV cache: sampled at
    `temperature` (seeded by `generator`), greedy at 0. The caller chooses the grad mode."""
    import torch

    res = model(ids, use_cache=True)
    for _ in range(new_tokens):
        logits = res.logits[:, -1].float()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        res = model(nxt, past_key_values=res.past_key_values, use_cache=True)
    return ids


def kd_loss(student_logits, teacher_logits, temperature: float):
    import torch.nn.functional as F

    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="batchmean") * t * t


def attention_kl(student_attentions, teacher_attentions):
    """Mean over layer pairs, heads and query positions of KL(teacher's attention || student's), each row
    a distribution over the keys (MiniLM). The causal mask's zeros are zero in both and add nothing."""
    import torch

    total = 0.0
    for s, t in zip(student_attentions, teacher_attentions):
        t = t.float()
        kl = t * (torch.log(t.clamp_min(1e-12)) - torch.log(s.float().clamp_min(1e-12)))
        total = total + kl.sum(-1).mean()
    return total / len(student_attentions)


def ce_loss(logits, ids):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kd_step(student, teacher, ids, opt, kd_w: float, hidden_w: float, attn_w: float, layer_map,
            attn_terms: list):
    """One batch's forward-KL loss (the terms in the module docstring); appends the attention term to attn_terms."""
    import torch

    out = student(ids, use_cache=False, output_hidden_states=hidden_w > 0, output_attentions=attn_w > 0)
    loss = (1 - kd_w) * ce_loss(out.logits, ids) if kd_w < 1 else 0.0
    if teacher is None:
        return loss
    with torch.no_grad():
        ref = teacher(ids, use_cache=False, output_hidden_states=hidden_w > 0, output_attentions=attn_w > 0)
    loss = loss + kd_w * kd_loss(out.logits, ref.logits, opt.temperature)
    if hidden_w > 0:  # hidden_states[0] is the embedding output; layer j's output is [j + 1]
        pairs = [(out.hidden_states[j + 1], ref.hidden_states[t + 1]) for j, t in enumerate(layer_map)]
        loss = loss + hidden_w * sum(((s - h) ** 2).mean() / (h ** 2).mean() for s, h in pairs) / len(pairs)
    if attn_w > 0:  # attentions[j] is layer j's map
        term = attention_kl(out.attentions, [ref.attentions[t] for t in layer_map])
        attn_terms.append(float(term))
        loss = loss + attn_w * term
    return loss


def train(student, teacher, calib: np.ndarray, opt, params, layer_map: list[int] | None = None,
          extra: np.ndarray | None = None, on_policy=None) -> dict:
    """Train `params` of `student` for opt.steps batches; return the loss curve's summary.
    `extra`: more training windows (see `windows`). The attention term needs both models in eager
    attention (the only implementation that returns the maps). `on_policy`: a step's loss is
    on_policy.loss(student, ids) on the same windows, and its info(seconds, batch) joins the summary."""
    import torch

    hidden_w = float(getattr(opt, "hidden_weight", 0.0)) if teacher is not None and layer_map else 0.0
    attn_w = float(getattr(opt, "attention_weight", 0.0)) if teacher is not None and layer_map else 0.0
    kd_w = float(getattr(opt, "kd_weight", 1.0)) if teacher is not None else 0.0
    optim = torch.optim.AdamW(params, lr=opt.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda i: 1.0 - i / max(1, opt.steps))
    student.train()
    losses, attn_terms, t0 = [], [], time.time()
    for ids in windows(calib, opt.seq_len, opt.batch, opt.steps, seed=getattr(opt, "seed", 0), extra=extra):
        if on_policy is not None:  # its own loss, on the student's continuations of these windows' prompts
            loss = on_policy.loss(student, ids)
        else:
            loss = kd_step(student, teacher, ids, opt, kd_w, hidden_w, attn_w, layer_map, attn_terms)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    student.eval()
    tail = max(1, len(losses) // 10)
    info = {"steps": len(losses), "loss_first": round(losses[0], 4), "loss_last": round(float(np.mean(losses[-tail:])), 4),
            "train_seconds": round(time.time() - t0, 1), "objective": "kd" if teacher is not None else "ce"}
    if on_policy is not None:
        info.update(on_policy.info(time.time() - t0, opt.batch))
    if attn_terms:
        info.update(attention_kl_first=round(attn_terms[0], 6), attention_kl_last=round(float(np.mean(attn_terms[-tail:])), 6))
    return info
