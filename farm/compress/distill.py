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

`divergence: reverse` trains on-policy instead (MiniLLM's single-step term, farm/compress/reverse_kl.py):
the student continues each step's calibration prompts itself and learns KL(student || teacher) on them,
mode-seeking where forward KL spreads the student's mass. It takes the same steps, batch, seq_len and lr,
so the two are comparable at equal steps; the additions above are forward-KL terms and are refused with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from farm.compress.common import Training, drop_layers, load, save_with_tokenizer
from farm.compress.kd import continuations, train
from farm.compress.reverse_kl import OnPolicy
from farm.inputs.modelref import ModelShape
from farm.plugin import PositiveGrid, as_list


class Options(Training):
    LABEL = "L{student_layers}{teacher_tag}"
    GRID = ("student_layers",)
    TAGS = {"teacher_continuations": "seq{teacher_continuations}", "attention_weight": "attn{attention_weight}",
            "kd_weight": "kd{kd_weight}", "divergence": "{divergence}", "rollout_temperature": "rt{rollout_temperature}"}
    method: Literal["distill"]
    student_layers: PositiveGrid = Field(
        ..., description="Decoder blocks of the student (fewer than the teacher's); a list is a grid.")
    lr: float = Field(1e-4, gt=0, le=1)
    hidden_weight: float = Field(0.0, ge=0, le=100, description="MiniLM-style hidden-state matching weight.")
    attention_weight: float = Field(
        0.0, ge=0, le=100, description="MiniLM-style attention-map KL weight (each student block against the "
        "teacher block it came from; trains in eager attention).")
    teacher_continuations: int = Field(
        0, ge=0, le=100_000, description="Sequence-level KD: windows whose second half the teacher writes from a "
        "calibration prompt, added to the training windows.")
    continuation_temperature: float = Field(
        0.0, ge=0, le=10, description="0: the teacher continues greedily; > 0: sampled at this temperature (seed).")
    divergence: Literal["forward", "reverse"] = Field(
        "forward", description="forward: KL(teacher || student) on the calibration windows; reverse: "
        "KL(student || teacher) on continuations the student samples from their prompts at each step "
        "(on-policy, MiniLLM's single-step term; kd_weight < 1 adds cross-entropy on the windows).")
    rollout_temperature: float = Field(
        1.0, ge=0, le=10, description="divergence: reverse: the temperature the student samples its continuations "
        "at (seed); 0: greedy.")

    @model_validator(mode="after")
    def _teacher_terms_need_a_teacher(self):
        for name in ("attention_weight", "teacher_continuations"):
            if getattr(self, name) and not self.teacher:
                raise ValueError(f"{name}: needs teacher: true (teacher: false is the control on the text alone)")
        return self

    @model_validator(mode="after")
    def _reverse_takes_only_its_own_terms(self):
        default = type(self).model_fields
        if self.divergence == "forward":
            if self.rollout_temperature != default["rollout_temperature"].default:
                raise ValueError("rollout_temperature: only divergence: reverse samples from the student; "
                                 "set divergence: reverse or remove rollout_temperature")
            return self
        if not self.teacher:
            raise ValueError("divergence: reverse needs teacher: true (the teacher scores the student's samples); "
                             "remove one of them")
        for name in ("hidden_weight", "attention_weight", "teacher_continuations"):
            if getattr(self, name):
                raise ValueError(f"{name}: a forward-KL addition that divergence: reverse does not combine with; "
                                 f"remove {name} or use divergence: forward")
        if self.temperature != default["temperature"].default:
            raise ValueError("temperature: softens the forward KL only; divergence: reverse compares the "
                             "unsoftened distributions (MiniLLM) — remove temperature; rollout_temperature sets "
                             "how the student samples")
        return self

    def check(self, shape: ModelShape):
        if shape.layers is None:
            return [], shape
        too_big = [k for k in as_list(self.student_layers) if k >= shape.layers]
        problems = [f"student_layers: {too_big} is not smaller than the teacher (the model entering this step "
                    f"has {shape.layers} blocks); use 1..{shape.layers - 1}"] if too_big else []
        return problems, shape.but(layers=max(as_list(self.student_layers)))


def student_layers(n_teacher: int, n_student: int) -> list[int]:
    if not 1 <= n_student < n_teacher:
        raise ValueError(f"distill.student_layers={n_student}: the teacher has {n_teacher} blocks; use 1..{n_teacher - 1}")
    return sorted({round(float(x)) for x in np.linspace(0, n_teacher - 1, n_student)})


def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict:
    import torch

    torch.manual_seed(opt.seed)
    teacher = load(model_dir, threads).eval()
    student = load(model_dir, threads)
    n = len(teacher.model.layers)
    keep = student_layers(n, opt.student_layers)
    drop_layers(student, [i for i in range(n) if i not in keep])
    for p in teacher.parameters():
        p.requires_grad_(False)
    use_teacher = opt.teacher
    attention = use_teacher and opt.attention_weight > 0
    if attention:  # sdpa returns no attention maps
        for m in (teacher, student):
            m.set_attn_implementation("eager")
    extra, extra_info = None, {}
    n_cont = opt.teacher_continuations if use_teacher else 0
    if n_cont:
        extra = continuations(teacher, calib, n_cont, opt.seq_len, opt.continuation_temperature,
                              seed=opt.seed)
        extra_info = {"teacher_continuations": len(extra), "continuation_tokens": opt.seq_len - opt.seq_len // 2}
    on_policy = OnPolicy(teacher, opt.seq_len, opt.rollout_temperature, opt.kd_weight, opt.seed) \
        if opt.divergence == "reverse" else None
    info = train(student, teacher if use_teacher else None, calib, opt, list(student.parameters()), layer_map=keep,
                 extra=extra, on_policy=on_policy)
    if attention:
        student.set_attn_implementation("sdpa")
    save_with_tokenizer(student, model_dir, out)
    return {**info, **extra_info, "kept_layers": keep, "layers_before": n, "layers_after": len(keep)}
