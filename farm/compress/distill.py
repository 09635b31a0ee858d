"""Knowledge distillation into a shallower student (DistilBERT-style initialisation, MiniLM-style
hidden-state matching optional).

The student keeps `student_layers` of the teacher's decoder blocks, evenly spaced from the first to
the last, with the teacher's weights (embedding, norms, lm_head included), and is then trained on the
calibration text to match the teacher's temperature-softened next-token distribution (farm/compress/
kd.py). The teacher is the model entering this step. `teacher: false` trains the same student for the
same steps on the cross-entropy of the text alone — the control that shows what distillation adds.

Two optional additions: `teacher_continuations` windows whose second half the teacher wrote from a
calibration prompt (sequence-level KD) join the training windows; `attention_weight` adds the KL
between the attention maps of each student block and the teacher block it was initialised from
(MiniLM), which runs both models with eager attention during training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from farm.compress.kd import continuations, train
from farm.compress.prune_layers import drop_layers, save_with_tokenizer


def student_layers(n_teacher: int, n_student: int) -> list[int]:
    if not 1 <= n_student < n_teacher:
        raise ValueError(f"distill.student_layers={n_student}: the teacher has {n_teacher} blocks; use 1..{n_teacher - 1}")
    return sorted({round(float(x)) for x in np.linspace(0, n_teacher - 1, n_student)})


def apply(model_dir: Path, step: dict, calib: np.ndarray, out: Path, threads: int) -> dict:
    import torch

    from farm.models import load_model

    torch.set_num_threads(threads)
    torch.manual_seed(step.get("seed", 0))
    teacher = load_model(model_dir).eval()
    student = load_model(model_dir)
    n = len(teacher.model.layers)
    keep = student_layers(n, int(step["student_layers"]))
    drop_layers(student, [i for i in range(n) if i not in keep])
    for p in teacher.parameters():
        p.requires_grad_(False)
    use_teacher = step.get("teacher", True)
    attention = use_teacher and float(step.get("attention_weight", 0.0)) > 0
    if attention:  # sdpa returns no attention maps
        for m in (teacher, student):
            m.set_attn_implementation("eager")
    extra, extra_info = None, {}
    n_cont = int(step.get("teacher_continuations", 0)) if use_teacher else 0
    if n_cont:
        extra = continuations(teacher, calib, n_cont, step["seq_len"], float(step.get("continuation_temperature", 0.0)),
                              seed=step.get("seed", 0))
        extra_info = {"teacher_continuations": len(extra), "continuation_tokens": step["seq_len"] - step["seq_len"] // 2}
    info = train(student, teacher if use_teacher else None, calib, step, list(student.parameters()), layer_map=keep,
                 extra=extra)
    if attention:
        student.set_attn_implementation("sdpa")
    save_with_tokenizer(student, model_dir, out)
    return {**info, **extra_info, "kept_layers": keep, "layers_before": n, "layers_after": len(keep)}
