"""What compression methods share: option bases, loading, calibration batches, hooked passes through the
model, the int4 grids (llama.cpp's Q4_0, sym, asym), scale folding, and saving with the tokenizer.
Options models here are torch-free (the spec imports them); torch is imported inside the helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from farm.inputs.modelref import ModelShape
from farm.inputs.models import save_with_tokenizer
from farm.plugin import Calibrated, StepOptions, group_problems

__all__ = ["Calibrated", "QuantGrid", "StepOptions", "Training", "save_with_tokenizer"]


class Training(StepOptions):
    """What every method that learns shares: a short AdamW run on the calibration text."""
    steps: int = Field(50, ge=1, le=100_000, description="Optimizer steps.")
    batch: int = Field(4, ge=1, le=256, description="Windows per step.")
    seq_len: int = Field(128, ge=16, le=8192, description="Tokens per window.")
    temperature: float = Field(2.0, gt=0, le=100, description="Softens both distributions in the KD loss.")
    kd_weight: float = Field(1.0, ge=0, le=1, description="KD loss weight; 1 - kd_weight goes to cross-entropy.")
    teacher: bool = Field(True, description="false: train on the text alone, the no-distillation control.")
    seed: int = Field(0, ge=0)


class QuantGrid(Calibrated):
    """Post-training int4 quantization in PyTorch onto one of GRIDS (gptq, awq)."""
    LABEL = "{grid}-g{group_size}"
    grid: Literal["q4_0", "sym", "asym"] = Field("q4_0", description="q4_0: llama.cpp's Q4_0 grid (groups of "
                      "32), re-quantized losslessly by the gguf Q4_0 export; sym/asym: int4 with group_size weights "
                      "per scale, for other runtimes.")
    group_size: int = Field(32, ge=8, le=4096, description="Weights per scale along the input (power of 2); "
                            "q4_0 is always 32.")
    calib_samples: int = Field(16, ge=1, le=1024, description="Calibration sequences.")

    @model_validator(mode="after")
    def _group(self):
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size: must be a power of two (16, 32, 64, 128, ...), got {self.group_size}")
        if self.grid == "q4_0" and self.group_size != 32:
            raise ValueError(f"group_size: the q4_0 grid has groups of 32 (llama.cpp's block), got "
                             f"{self.group_size}; remove group_size or use grid sym/asym")
        return self

    def check(self, shape: ModelShape):
        return (group_problems(self.group_size, shape) if self.grid != "q4_0" else []), shape


def load(model_dir: Path, threads: int):
    """The model to compress, in float32, with torch using `threads` threads."""
    import torch

    from farm.inputs.models import load_model

    torch.set_num_threads(threads)
    return load_model(model_dir)


GRIDS = ("q4_0", "sym", "asym")
Q4_0_GROUP = 32  # llama.cpp's QK4_0
FOLDABLE = ("llama", "mistral", "qwen2", "qwen3")  # RMSNorm y = w·x̂: dividing w by s is exact


def run_hooked(model, batches: list, handles: list) -> None:
    """Run the calibration batches through the model, then remove the hooks that watched them."""
    import torch

    try:
        with torch.inference_mode():
            for ids in batches:
                model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def drop_layers(model, drop: list[int]) -> None:
    import torch

    keep = [layer for i, layer in enumerate(model.model.layers) if i not in set(drop)]
    for new_idx, layer in enumerate(keep):
        layer.self_attn.layer_idx = new_idx
    model.model.layers = torch.nn.ModuleList(keep)
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in set(drop)]


def calibration_batches(calib: np.ndarray, opt: Calibrated, method: str) -> list:
    """The first calib_samples windows of seq_len calibration tokens, as [1, seq_len] tensors: exactly what
    the options say, never fewer (the spec refuses a sweep whose data.calib_tokens is too short)."""
    import torch

    seq, n = opt.seq_len, opt.calib_samples
    if n * seq > len(calib):
        raise ValueError(f"{method}: calib_samples {n} x seq_len {seq} needs {n * seq} calibration tokens, have "
                         f"{len(calib)} — raise data.calib_tokens or lower calib_samples/seq_len")
    return [torch.tensor(calib[i * seq:(i + 1) * seq]).unsqueeze(0) for i in range(n)]


# ---- blocks ---------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def block_inputs(model, batches: list) -> list:
    """(hidden states, keyword arguments) entering the first decoder block, one pair per batch."""
    import torch

    captured = []

    def hook(module, args, kwargs):
        kw = dict(kwargs)
        hidden = args[0] if args else kw.pop("hidden_states")
        captured.append((hidden, kw))
        raise Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(ids, use_cache=False)
                except Stop:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(layer, inputs: list) -> list:
    """The block's outputs for each (hidden, kwargs) pair, as the next block's inputs."""
    import torch

    out = []
    with torch.no_grad():
        for hidden, kw in inputs:
            y = layer(hidden, **kw)
            out.append((y[0] if isinstance(y, tuple) else y, kw))
    return out


# ---- the grid -------------------------------------------------------------------------------------
def grid_params(w, grid: str):
    """Scale and zero point of each row of w [rows, k] (one group per row)."""
    import torch

    if grid == "q4_0":
        signed_max = w.gather(1, w.abs().argmax(1, keepdim=True))  # first of equal |x|, as llama.cpp
        return signed_max / -8, torch.full_like(signed_max, 8.0)
    if grid == "sym":
        scale = 2 * w.abs().amax(1, keepdim=True) / 15
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.full_like(scale, 8.0)
    lo = w.amin(1, keepdim=True).clamp(max=0)
    hi = w.amax(1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.round(-lo / scale)


def fake_quant(x, scale, zero, grid: str):
    """x quantized to the grid and de-quantized (scale, zero broadcast against x)."""
    import torch

    if grid == "q4_0":  # quantize_row_q4_0_ref: x * (1/d) + 8.5 truncated, d stored as fp16
        inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
        q = torch.floor(x * inv + 8.5).clamp(0, 15)
        return scale.half().float() * (q - 8)
    q = (torch.round(x / scale) + zero).clamp(0, 15)
    return scale * (q - zero)


def rtn(w, grid: str, group_size: int):
    """Round to nearest on the grid, group by group along the input dimension: the baseline."""
    rows, cols = w.shape
    g = w.float().reshape(-1, group_size)
    scale, zero = grid_params(g, grid)
    return fake_quant(g, scale, zero, grid).reshape(rows, cols).to(w.dtype)


def check_group(grid: str, group_size: int, width: int, method: str) -> int:
    if grid == "q4_0":
        group_size = Q4_0_GROUP
    if width % group_size:
        raise ValueError(f"{method}.group_size={group_size} does not divide the layer width {width}; "
                         "use a smaller power of two")
    return group_size


def fold(prev, linears: list, s) -> None:
    """prev's output channels / s, the linears' input channels * s: the same function."""
    with_rows = prev.weight.data.dim() == 2  # a linear (its output rows) or a norm (its weight vector)
    if with_rows:
        prev.weight.data.div_(s.unsqueeze(1))
    else:
        prev.weight.data.div_(s)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data.div_(s)
    for lin in linears:
        lin.weight.data.mul_(s)
