"""LoRA healing (peft): low-rank adapters on the linear layers of the model entering this step, trained
to match the *base* model (the sweep's unpruned teacher) by distillation on the calibration text, then
merged into the weights so that every exporter sees a plain dense checkpoint of the same shape.

QLoRA (`base_bits: 4`, Dettmers et al. 2023): the model entering the step is loaded in bitsandbytes'
4-bit NormalFloat (double quantization, fp32 compute) and frozen; the adapters train in fp32 on top.
peft's own merge of a 4-bit layer re-quantizes the sum to NF4, so farm merges densely instead: every
NF4 weight is dequantized and the adapter's delta added, giving an fp32 checkpoint of the same shape
that *is* the trained model (its base weights are NF4-rounded). Both paths check that the merged
model's logits equal the adapted model's on a calibration window (`merge_max_abs_logit_diff`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from farm.compress.common import Training, save_with_tokenizer
from farm.compress.kd import train
from farm.plugin import PositiveGrid

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Options(Training):
    """Heals the model entering it towards the sweep's base model (the teacher), then merges."""
    LABEL = "r{rank}{teacher_tag}"
    GRID = ("rank",)
    TAGS = {"base_bits": "nf{base_bits}"}
    TEACHER = True
    method: Literal["lora"]
    rank: PositiveGrid = Field(8, description="LoRA rank (> 0); a list is a grid.")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[Literal[TARGETS]] = Field(list(TARGETS), min_length=1)  # type: ignore[valid-type]
    lr: float = Field(5e-4, gt=0, le=1)
    base_bits: int | None = Field(
        None, description="4: QLoRA — the model entering the step is frozen in bitsandbytes NF4 while the "
        "adapters train; then dequantized and merged into a dense checkpoint. null: plain LoRA.")

    _nf4 = field_validator("base_bits")(lambda v: nf4_only(v))


def nf4_only(base_bits: int | None) -> int | None:
    """base_bits of a LoRA step: 4 (QLoRA on an NF4 base) or None."""
    if base_bits not in (None, 4):
        raise ValueError(f"{base_bits} is not supported: 4 (NF4, QLoRA), or leave it out for plain LoRA")
    return base_bits


def load_nf4(model_dir: Path):
    """The model with every decoder linear layer in bitsandbytes NF4 (embeddings, norms, lm_head stay)."""
    import torch
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from farm.inputs.models import trust_remote_code

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, use_safetensors=True,
                                                 device_map="cpu", dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code())
    for m in model.modules():
        # On CPUs with AVX512-BF16, bitsandbytes repacks a layer's weights with bf16 scales at its first
        # inference-mode forward; keep the one fp32 dequantization that training used, so that the
        # adapted model and its dense merge compute the same function.
        if isinstance(m, Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def dequantized(weight):
    import bitsandbytes.functional as bnbf

    state = weight.quant_state
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):  # see load_nf4
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
    return bnbf.dequantize_4bit(data, state).float()


def dense_merge(peft_model, model_dir: Path):
    """A plain float32 model of the same shape: NF4 weights dequantized, each adapter's delta added."""
    import torch
    from bitsandbytes.nn import Linear4bit
    from peft.tuners.lora import LoraLayer

    from farm.inputs.models import load_model

    dense = load_model(model_dir)
    inner = peft_model.get_base_model()
    with torch.no_grad():
        for name, module in inner.named_modules():
            if isinstance(module, Linear4bit):  # `<name>.base_layer` under a LoRA layer
                target = dense.get_submodule(name.removesuffix(".base_layer"))
                target.weight.copy_(dequantized(module.weight))
                if module.bias is not None:
                    target.bias.copy_(module.bias.float())
        for name, module in inner.named_modules():
            if isinstance(module, LoraLayer):
                target = dense.get_submodule(name)
                for adapter in module.active_adapters:
                    target.weight.add_(module.get_delta_weight(adapter).float())
    return dense.eval()


def logit_gap(a, b, ids) -> float:
    import torch

    with torch.no_grad():
        return float((a(ids, use_cache=False).logits.float() - b(ids, use_cache=False).logits.float()).abs().max())


def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int,
          teacher_dir: Path | None = None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from farm.inputs.models import load_model

    torch.set_num_threads(threads)
    torch.manual_seed(opt.seed)
    bits = opt.base_bits
    if bits == 4:  # freezes the base, keeps fp32 compute; no gradient checkpointing: the model is small
        model = prepare_model_for_kbit_training(load_nf4(model_dir), use_gradient_checkpointing=False)
    else:
        model = load_model(model_dir)
    teacher = None
    if opt.teacher:
        teacher = load_model(teacher_dir or model_dir).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    config = LoraConfig(r=opt.rank, lora_alpha=opt.alpha, lora_dropout=opt.dropout,
                        target_modules=list(opt.targets), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    info = train(peft_model, teacher, calib, opt, params)
    probe = torch.tensor(calib[: min(len(calib), opt.seq_len)]).unsqueeze(0)
    if bits == 4:
        merged = dense_merge(peft_model, model_dir)
        gap = logit_gap(peft_model.eval(), merged, probe)
    else:
        with torch.no_grad():
            before = peft_model.eval()(probe, use_cache=False).logits
            merged = peft_model.merge_and_unload()
            gap = float((merged(probe, use_cache=False).logits - before).abs().max())
    if not gap < 1e-2:
        raise RuntimeError(f"lora: the merged model's logits differ from the adapted model's by {gap:.3g} — report this")
    save_with_tokenizer(merged, model_dir, out)
    return {**info, "trainable_params": sum(p.numel() for p in params), "base_bits": bits or 32,
            "merge_max_abs_logit_diff": round(gap, 6),
            "teacher": str(teacher_dir) if teacher is not None and teacher_dir else "self"}
