"""Training shared by the methods that learn (distill, lora): calibration windows, the distillation
loss, one small AdamW loop on the CPU.

Loss = kd_weight * T^2 * KL(teacher_T || student_T)            (forward KL, temperature-softened)
     + (1 - kd_weight) * cross-entropy on the next token         (the data's own labels)
     + hidden_weight * mean ||h_s - h_t||^2 / ||h_t||^2          (hidden states of paired layers)
Without a teacher (`teacher: false`, the control run) the loss is the cross-entropy alone.
"""

from __future__ import annotations

import time

import numpy as np


def windows(calib: np.ndarray, seq_len: int, batch: int, steps: int, seed: int = 0):
    """`steps` batches of random calibration windows; the same for every run with the same seed."""
    import torch

    if len(calib) < seq_len + 1:
        raise ValueError(f"need at least {seq_len + 1} calibration tokens, have {len(calib)} — raise data.calib_tokens")
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(calib) - seq_len, size=batch)
        yield torch.tensor(np.stack([calib[s:s + seq_len] for s in starts]), dtype=torch.long)


def kd_loss(student_logits, teacher_logits, temperature: float):
    import torch.nn.functional as F

    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="batchmean") * t * t


def ce_loss(logits, ids):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def train(student, teacher, calib: np.ndarray, step: dict, params, layer_map: list[int] | None = None) -> dict:
    """Train `params` of `student` for step['steps'] batches; return the loss curve's summary."""
    import torch

    hidden_w = float(step.get("hidden_weight", 0.0)) if teacher is not None and layer_map else 0.0
    kd_w = float(step.get("kd_weight", 1.0)) if teacher is not None else 0.0
    opt = torch.optim.AdamW(params, lr=step["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / max(1, step["steps"]))
    student.train()
    losses, t0 = [], time.time()
    for ids in windows(calib, step["seq_len"], step["batch"], step["steps"], seed=step.get("seed", 0)):
        out = student(ids, use_cache=False, output_hidden_states=hidden_w > 0)
        loss = (1 - kd_w) * ce_loss(out.logits, ids) if kd_w < 1 else 0.0
        if teacher is not None:
            with torch.no_grad():
                ref = teacher(ids, use_cache=False, output_hidden_states=hidden_w > 0)
            loss = loss + kd_w * kd_loss(out.logits, ref.logits, step["temperature"])
            if hidden_w > 0:  # hidden_states[0] is the embedding output; layer j's output is [j + 1]
                pairs = [(out.hidden_states[j + 1], ref.hidden_states[t + 1]) for j, t in enumerate(layer_map)]
                loss = loss + hidden_w * sum(((s - h) ** 2).mean() / (h ** 2).mean() for s, h in pairs) / len(pairs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    student.eval()
    tail = max(1, len(losses) // 10)
    return {"steps": len(losses), "loss_first": round(losses[0], 4), "loss_last": round(float(np.mean(losses[-tail:])), 4),
            "train_seconds": round(time.time() - t0, 1), "objective": "kd" if teacher is not None else "ce"}
