"""OpenVINO IR export through optimum-intel (stateful: the KV cache lives inside the model), weights
compressed by NNCF.

Levels:
  fp32                 optimum-intel's export, weights fp32; run with f32 inference precision
  fp16                 the fp32 IR with its weights stored in fp16
  int8                 NNCF weight compression, int8 asymmetric per output channel (data-free)
  int4_sym, int4_asym  NNCF int4 weight compression, `group_size` weights per scale; `ratio` of the
                       weights in int4, the rest (and, as NNCF does by default, the embedding and the
                       tied lm_head) in int8. `algorithm`: rtn (data-free), or on the calibration
                       tokens awq, scale_estimation, awq_se (both) or gptq.
Other levels start from the fp32 IR. The runtime reads farm_runtime.json for settings a level implies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from farm.errors import ToolError
from farm.export.common import GATHERS, BlockwiseExport, copy_side_files, hf_shape, terminal
from farm.inputs.models import trust_remote_code


class Options(BlockwiseExport):
    LEVELS = ("fp32", "fp16", "int8", "int4_sym", "int4_asym")
    DIRECT = ("fp32",)
    BASE_LEVEL = "fp32"
    FULL_PRECISION = ("fp32",)
    RUNTIME = "openvino"
    GROUPED = ("int4_sym", "int4_asym")
    ALGORITHMS = ("rtn", "awq", "scale_estimation", "awq_se", "gptq")
    DATA_AWARE = ("awq", "scale_estimation", "awq_se", "gptq")
    format: Literal["openvino"]
    ratio: float = Field(1.0, gt=0, le=1, description="int4 levels: share of weights in int4 (the rest int8).")

    @model_validator(mode="after")
    def _ratio_for_int4(self):
        if self.ratio != 1.0 and not any(self.is_int4(q) for q in self.levels()):
            raise ValueError("ratio: only the int4 levels mix int4 with int8; remove it")
        return self

    def params(self, quant: str) -> list[dict]:
        return [{**p, "ratio": self.ratio} if "algorithm" in p else p for p in super().params(quant)]

MODEL = "openvino_model.xml"


def export(source: Path, params: dict, out_dir: Path, threads: int = 1, calib=None) -> Path:
    out = out_dir / f"openvino-{params['quant']}"
    if params["quant"] == "fp32":
        export_fp32(source, out, threads)
        settings = {"INFERENCE_PRECISION_HINT": "f32"}  # fp32 means fp32 math, not the CPU's bf16 default
    else:
        compress(source, params, out, calib)
        settings = {}
    (out / "farm_runtime.json").write_text(json.dumps(settings))
    check_complete(out)
    return out


def export_fp32(model_dir: Path, out: Path, threads: int) -> None:
    import torch
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    torch.set_num_threads(threads)
    main_export(str(model_dir), output=str(out), task="text-generation-with-past", stateful=True,
                convert_tokenizer=False, ov_config=OVConfig(dtype="fp32"),
                trust_remote_code=trust_remote_code())
    copy_side_files(model_dir, out)


def check_complete(out: Path) -> None:
    missing = [n for n in (MODEL, "openvino_model.bin", "config.json") if not (out / n).is_file()]
    if not ((out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()):
        missing.append("tokenizer.json")
    if missing:
        raise ToolError(f"the OpenVINO export in {out} is incomplete: {', '.join(missing)} missing")


def calibration(calib: np.ndarray, samples: int, seq_len: int):
    """Prefill inputs of the stateful model, one per calibration sequence."""
    import nncf

    seqs = calib[: samples * seq_len].reshape(samples, seq_len)
    return nncf.Dataset([{"input_ids": s[None].astype(np.int64), "attention_mask": np.ones((1, seq_len), np.int64),
                          "position_ids": np.arange(seq_len, dtype=np.int64)[None],
                          "beam_idx": np.zeros(1, np.int32)} for s in seqs])


def compress(src: Path, params: dict, out: Path, calib: np.ndarray | None) -> None:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(src / MODEL))
    quant = params["quant"]
    out.mkdir()
    if quant == "fp16":
        ov.save_model(model, str(out / MODEL), compress_to_fp16=True)
    else:
        if quant == "int8":
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        else:
            alg = params["algorithm"]
            mode = nncf.CompressWeightsMode.INT4_SYM if quant == "int4_sym" else nncf.CompressWeightsMode.INT4_ASYM
            extra = {}
            if alg != "rtn":
                extra = {"dataset": calibration(calib, params["calib_samples"], params["calib_seq_len"]),
                         "subset_size": params["calib_samples"], "awq": alg in ("awq", "awq_se"),
                         "scale_estimation": alg in ("scale_estimation", "awq_se"), "gptq": alg == "gptq"}
            model = nncf.compress_weights(model, mode=mode, group_size=params["group_size"], ratio=params["ratio"],
                                          **extra)
        ov.save_model(model, str(out / MODEL), compress_to_fp16=False)
    copy_side_files(src, out)


def decode_bytes(path: Path, settings: dict) -> tuple[int, dict]:
    """The bytes a decode step reads (every constant but a table only gathered from) and the KV cache's shape, at
    the KV precision the runtime ran with."""
    kv_precision = settings.get("KV_CACHE_PRECISION")
    import openvino as ov

    model = ov.Core().read_model(str(path / "openvino_model.xml"))
    total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        users = terminal(op, lambda n: [t.get_node() for o in n.outputs() for t in o.get_target_inputs()],
                          lambda n: n.get_type_name())
        if users and users <= GATHERS:
            continue
        total += int(op.get_byte_size())
    shape = hf_shape(path)
    shape["kv_bytes"] = {"u8": 1, "i8": 1, "f16": 2, "bf16": 2, "f32": 4}.get((kv_precision or "f16").lower(), 2)
    return total, shape
