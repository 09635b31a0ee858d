"""Intel's AutoRound (Cheng et al., 2023; PyPI `auto-round`) as a method beside farm's own GPTQ and AWQ: block by
block, signed gradient descent tunes each weight's rounding offset and the groups' scale range to reproduce
the block's float outputs on the calibration tokens. A maintained external implementation on the same grid
and calibration data as `gptq`/`awq`, so the sweep compares them, and checks farm's own, on equal terms.

The grid is llama.cpp's Q4_0 (groups of 32, levels -8..7, one signed scale), which is AutoRound's own
symmetric 4-bit convention; its scales are fp16, llama.cpp's too. A group AutoRound leaves without a weight on
level -8 would get another scale from llama.cpp's quantizer, so every group is snapped to farm's exact Q4_0
grid (`common.rtn`) after AutoRound: the GGUF Q4_0 export then reproduces the weights exactly, and the step
records how many groups the snap changed (`groups_snapped`; 0 when AutoRound already sat on the grid).

AutoRound is run offline on what farm gives it: the model and tokenizer in memory and the calibration windows
as token tensors (its default data set is on a hub and is never asked for). Two defaults are off: `amp` (on a
CPU with AVX512-BF16 it casts the model to bf16, and the weights leave the grid) and torch.compile.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from farm.compress.common import Q4_0_GROUP, calibration_batches, load, rtn, save_with_tokenizer
from farm.plugin import Calibrated


class Options(Calibrated):
    """AutoRound int4 on llama.cpp's Q4_0 grid (sym, groups of 32)."""
    LABEL = "{grid}-i{iters}"
    method: Literal["autoround"]
    grid: Literal["q4_0"] = Field("q4_0", description="q4_0: llama.cpp's grid (AutoRound sym 4-bit, groups of 32).")
    iters: int = Field(200, ge=1, le=10_000, description="Tuning steps per block (AutoRound's default 200; 50: its "
                       "'light' recipe).")
    lr: float | None = Field(None, gt=0, description="Learning rate of the rounding offsets; null: 1 / iters.")
    batch_size: int = Field(8, ge=1, le=256, description="Calibration windows per tuning step.")
    calib_samples: int = Field(32, ge=1, le=1024, description="Calibration sequences.")
    seq_len: int = Field(256, ge=16, le=8192, description="Tokens per calibration sequence.")


def apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing from a hub: the data is ours
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("AR_WORK_SPACE", str(out.parent / "ar_work_space"))  # its offload scratch, in the stage
    from auto_round import AutoRound

    from farm.inputs.models import load_tokenizer

    t0 = time.time()
    model = load(model_dir, threads)
    tok = load_tokenizer(model_dir)
    batches = calibration_batches(calib, opt, "autoround")
    ar = AutoRound(model, tokenizer=tok, bits=4, group_size=Q4_0_GROUP, sym=True, iters=opt.iters, lr=opt.lr,
                   nsamples=opt.calib_samples, seqlen=opt.seq_len, batch_size=min(opt.batch_size, opt.calib_samples),
                   dataset=batches, device_map="cpu", amp=False, enable_torch_compile=False, seed=42)
    ar.quantize()  # writes the fake-quantized weights into `model` itself
    snapped = groups = layers = 0
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in layer.modules():
                if not isinstance(lin, torch.nn.Linear):
                    continue
                w = lin.weight.data.float()
                q = rtn(w, "q4_0", Q4_0_GROUP)
                changed = (q != w).reshape(-1, Q4_0_GROUP).any(1)
                snapped += int(changed.sum())
                groups += changed.numel()
                layers += 1
                lin.weight.data.copy_(q.to(lin.weight.dtype))
    save_with_tokenizer(model.float(), model_dir, out)
    return {"layers_quantized": layers, "grid": "q4_0", "group_size": Q4_0_GROUP, "iters": opt.iters,
            "groups": groups, "groups_snapped": snapped, "seconds": round(time.time() - t0, 1),
            "auto_round": _version()}


def _version() -> str:
    from importlib.metadata import version

    return version("auto-round")
