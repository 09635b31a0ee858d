"""PyTorch cells quantized by bitsandbytes: `nf4` (QLoRA's 4-bit NormalFloat, double quantization,
fp32 compute) and `llm_int8` (LLM.int8(): int8 weights with fp16 outlier columns). The quantized model
is saved as it loads (safetensors with bitsandbytes' packed weights and quantization_config in
config.json), so its size on disk is real and the torch runtime loads it back as measured. The `fp32`
level needs no export: its artifact is the Hugging Face directory itself (the baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from farm.export.common import ExportOptions, hf_shape
from farm.inputs.models import save_with_tokenizer


class Options(ExportOptions):
    LEVELS = ("fp32", "nf4", "llm_int8")
    DIRECT = LEVELS
    RUNTIME = "torch"
    format: Literal["torch"]


def config(quant: str):
    import torch
    from transformers import BitsAndBytesConfig

    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


def export(source: Path, params: dict, out_dir: Path, threads: int = 1, calib=None) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from farm.inputs.models import trust_remote_code

    if params["quant"] == "fp32":  # the Hugging Face directory itself is the artifact (the baseline)
        return source
    torch.set_num_threads(threads)
    out = out_dir / f"torch-{params['quant']}"
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config(params["quant"]),
                                                 use_safetensors=True, device_map="cpu",
                                                 trust_remote_code=trust_remote_code())
    out.mkdir()
    save_with_tokenizer(model, source, out)
    return out


# bytes per element of each safetensors dtype: bitsandbytes saves NF4 packed in U8 and LLM.int8 weights as I8
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U8": 1, "BOOL": 1}


def decode_bytes(path: Path, settings: dict) -> tuple[int, dict]:
    """The bytes a decode step reads (every weight but an untied embedding table) and the KV cache's shape."""
    from safetensors import safe_open

    total, shape = 0, hf_shape(path)
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for name in st.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if "embed_tokens" in name and not shape.get("tied"):
                    continue
                sl = st.get_slice(name)
                total += int(np.prod(sl.get_shape())) * ITEMSIZE[sl.get_dtype()]
    shape["kv_bytes"] = 4
    return total, shape
