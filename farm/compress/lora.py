"""LoRA healing (peft): low-rank adapters on the linear layers of the model entering this step, trained
to match the *base* model (the sweep's unpruned teacher) by distillation on the calibration text, then
merged into the weights so that every exporter sees a plain dense checkpoint of the same shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from farm.compress.kd import train
from farm.compress.prune_layers import save_with_tokenizer


def apply(model_dir: Path, step: dict, calib: np.ndarray, out: Path, threads: int,
          teacher_dir: Path | None = None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from farm.models import load_model

    torch.set_num_threads(threads)
    torch.manual_seed(step.get("seed", 0))
    model = load_model(model_dir)
    teacher = None
    if step.get("teacher", True):
        teacher = load_model(teacher_dir or model_dir).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    config = LoraConfig(r=int(step["rank"]), lora_alpha=float(step["alpha"]), lora_dropout=float(step["dropout"]),
                        target_modules=list(step["targets"]), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    info = train(peft_model, teacher, calib, step, params)
    merged = peft_model.merge_and_unload()
    save_with_tokenizer(merged, model_dir, out)
    return {**info, "trainable_params": sum(p.numel() for p in params),
            "teacher": str(teacher_dir) if teacher is not None and teacher_dir else "self"}
