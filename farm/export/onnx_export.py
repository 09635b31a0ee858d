"""ONNX export through optimum-onnx (decoder with past key values), quantized by ONNX Runtime's tools.

Levels:
  fp32          optimum's export (`text-generation-with-past`); every other level starts from it
  int8_dynamic  ONNX Runtime's dynamic quantization: int8 weights per tensor, activations quantized
                at run time (MatMulInteger), on the MatMul and the embedding Gather
  int8, int4    weight-only block-wise MatMulNBits (`group_size` weights per scale, symmetric). int8:
                every MatMul. int4: the decoder's MatMuls by `algorithm` — rtn, hqq, k_quant
                (data-free) or gptq (on the calibration tokens) — the lm_head in 8 bits, the
                embedding table in 4 bits (round to nearest); int8 leaves the tied table in fp32

The base model's lm_head is tied to the embedding: the exported graph feeds the last MatMul through a
Transpose of the embedding table, which no quantizer touches ("MatMul doesn't have const weight").
Before quantizing, the lm_head gets its own constant (the transposed table), so that it is quantized
like every other MatMul, and the embedding Gather is quantized too (GatherBlockQuantized, 4 bits). The
int8 level keeps the tie (lm_head and embedding in fp32): ONNX Runtime's Gather quantizer is 4-bit
only, so untying would store the table twice. Sizes are the files on disk.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from farm.errors import ToolError
from farm.export.common import GATHERS, BlockwiseExport, copy_side_files, hf_shape, terminal
from farm.inputs.modelref import ModelShape
from farm.inputs.models import trust_remote_code
from farm.procs import run_tool, timeout_for_conversion
from farm.plugin import as_list

MODEL = "model.onnx"
GENAI_LEVELS = ("fp32", "int4")  # what onnxruntime-genai's model builder writes


class Options(BlockwiseExport):
    """builder optimum: optimum's graph, quantized by ONNX Runtime's tools from the fp32 export; builder genai:
    ONNX Runtime GenAI's model builder writes its own graph at each level (build_genai below)."""
    LEVELS = ("fp32", "int8_dynamic", "int8", "int4")
    DIRECT = ("fp32",)
    BASE_LEVEL = "fp32"
    FULL_PRECISION = ("fp32",)
    RUNTIME = "onnxruntime"
    GROUPED = ("int8", "int4")
    ALGORITHMS = ("rtn", "hqq", "k_quant", "gptq")
    DATA_AWARE = ("gptq",)
    format: Literal["onnx"]
    builder: Literal["optimum", "genai"] = Field(
        "optimum", description="optimum: optimum's export + ONNX Runtime quantizers; genai: ONNX Runtime GenAI's "
        "model builder (levels fp32, int4; fused attention, faster on CPU).")

    @model_validator(mode="after")
    def _genai_levels(self):
        if self.builder == "genai":
            bad = [q for q in self.levels() if q not in GENAI_LEVELS]
            if bad:
                raise ValueError(f"quant: the genai builder writes {', '.join(GENAI_LEVELS)}, not {bad}")
            if self.algorithm != "rtn":
                raise ValueError("algorithm: the genai builder quantizes int4 itself (rtn); remove algorithm")
        return self

    def params(self, quant: str) -> list[dict]:
        if self.builder == "optimum":
            return super().params(quant)
        return [{"format": "onnx", "quant": quant, "builder": "genai",
                 **({"group_size": self.group_size} if quant == "int4" else {})}]

    def source(self, params: dict) -> dict | None:
        return None if params.get("builder") == "genai" else super().source(params)

    def check(self, shape: ModelShape, calib_tokens: int) -> list[str]:
        problems = super().check(shape, calib_tokens)
        packed = [a for a in as_list(self.algorithm) if a in ("k_quant", "gptq")]
        odd = {k: w // self.group_size for k, w in shape.widths().items()
               if w % self.group_size == 0 and (w // self.group_size) % 2}
        if packed and odd:  # ONNX Runtime packs two zero points per byte per row for these two algorithms
            problems.append(f"group_size: onnx {packed} need an even number of groups per row, but "
                            f"{self.group_size} gives {', '.join(f'{n} for {k}' for k, n in odd.items())}; "
                            f"use {self.group_size // 2}")
        return problems
LARGE = 1_800_000_000
# MatMulNBits computes with int8 activations (ONNX Runtime GenAI's choice for CPU int4); its error is
# part of what the quality metrics measure
ACCURACY_LEVEL = 4  # protobuf's 2 GB limit: bigger graphs keep their weights in a side file


def export(source: Path, params: dict, out_dir: Path, threads: int = 1, calib=None) -> Path:
    if params.get("builder") == "genai":
        return build_genai(source, params, out_dir, threads)
    out = out_dir / f"onnx-{params['quant']}"
    if params["quant"] == "fp32":
        export_fp32(source, out, threads)
    else:
        quantize(source, params, out, calib)
    check_complete(out)
    return out


def export_fp32(model_dir: Path, out: Path, threads: int) -> None:
    import torch
    from optimum.exporters.onnx import main_export

    torch.set_num_threads(threads)
    main_export(str(model_dir), output=str(out), task="text-generation-with-past", device="cpu",
                do_validation=False, trust_remote_code=trust_remote_code())
    copy_side_files(model_dir, out)  # optimum skips files it cannot handle, and says so only in its debug log


def check_complete(out: Path) -> None:
    missing = [n for n in (MODEL, "config.json") if not (out / n).is_file()]
    if not ((out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()):
        missing.append("tokenizer.json")
    if missing:
        raise ToolError(f"the ONNX export in {out} is incomplete: {', '.join(missing)} missing")


def untie_lm_head(model) -> bool:
    """Give a MatMul fed by Transpose(initializer) its own transposed constant; True if one was found."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    found = False
    for tr in [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]:
        users = [n for n in model.graph.node if tr.output[0] in n.input]
        if not users or any(u.op_type != "MatMul" for u in users):
            continue
        table = numpy_helper.to_array(inits[tr.input[0]])
        name = f"{tr.input[0]}.lm_head_t"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), name))
        for u in users:
            u.input[list(u.input).index(tr.output[0])] = name
        model.graph.node.remove(tr)
        found = True
    return found


def save(model, path: Path) -> None:
    import onnx

    large = model.ByteSize() > LARGE if hasattr(model, "ByteSize") else True
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{path.name}_data")


class Calibration:
    """Prefill feeds of the calibration tokens, as ONNX Runtime's GPTQ reads them (iterated, or through
    CalibrationDataReader's get_next)."""

    def __init__(self, model, calib: np.ndarray, samples: int, seq_len: int):
        seqs = calib[: samples * seq_len].reshape(samples, seq_len)
        past = {}
        for i in model.graph.input:
            if i.name.startswith("past_key_values"):
                dims = [d.dim_value for d in i.type.tensor_type.shape.dim]  # [batch, heads, past, head_dim]
                past[i.name] = np.zeros((1, dims[1], 0, dims[3]), dtype=np.float32)
        self.feeds = [{"input_ids": s[None].astype(np.int64), "attention_mask": np.ones((1, seq_len), np.int64),
                       "position_ids": np.arange(seq_len, dtype=np.int64)[None], **past} for s in seqs]
        self.next = 0

    def __iter__(self):
        return iter(self.feeds)

    def get_next(self):
        self.next += 1
        return self.feeds[self.next - 1] if self.next <= len(self.feeds) else None

    def rewind(self):
        self.next = 0


def quantize(src: Path, params: dict, out: Path, calib: np.ndarray | None) -> None:
    import onnx

    out.mkdir()
    model = onnx.load(str(src / MODEL))
    quant = params["quant"]
    if quant != "int8":  # int8 keeps the tie: its embedding Gather stays fp32, and an untied 8-bit lm_head
        untie_lm_head(model)  # would store the table twice (embedded model: 257 MB untied vs ~229 tied)
    if quant == "int8_dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = out / "untied.onnx"
        save(model, tmp)
        quantize_dynamic(str(tmp), str(out / MODEL), weight_type=QuantType.QInt8, per_channel=False,
                         op_types_to_quantize=["MatMul", "Gather"], use_external_data_format=False)
        for f in out.glob("untied.onnx*"):
            f.unlink()
    else:
        bits = 8 if quant == "int8" else 4
        model = matmul_nbits(model, bits, params, calib)
        save(model, out / MODEL)
    copy_side_files(src, out)


def lm_head_nodes(model) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and any(i.endswith(".lm_head_t") for i in n.input)]


def matmul_nbits(model, bits: int, params: dict, calib: np.ndarray | None):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    group, alg = params["group_size"], params.get("algorithm", "rtn")
    if bits == 8:  # every MatMul with a constant weight (the tied lm_head has none)
        return run_quantizer(model, 8, group, rtn_config(group, ("MatMul",)))
    lm_head = lm_head_nodes(model)
    if alg == "rtn":
        cfg = rtn_config(group, ("MatMul",))
    elif alg == "hqq":
        cfg = mnb.HQQWeightOnlyQuantConfig(block_size=group, bits=4)
    elif alg == "k_quant":
        cfg = mnb.KQuantWeightOnlyQuantConfig()
    elif alg == "gptq":
        reader = Calibration(model, calib, params["calib_samples"], params["calib_seq_len"])
        cfg = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader)  # group: the quantizer's block_size
    else:
        raise ToolError(f"unknown ONNX int4 algorithm '{alg}'")
    model = run_quantizer(model, 4, group, cfg, exclude=lm_head)
    # the lm_head in 8 bits, as llama.cpp and NNCF keep the output layer above 4 bits (all-4-bit: perplexity
    # 30.9 vs 23.8 on the embedded model, base 16.5); then the embedding table in 4 bits
    if lm_head:
        model = run_quantizer(model, 8, group, rtn_config(group, ("MatMul",)), include=lm_head)
    return run_quantizer(model, 4, group, rtn_config(group, ("Gather",)))


def rtn_config(group: int, ops: tuple[str, ...]):
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    axes = tuple((op, 0 if op == "MatMul" else 1) for op in ops)
    return mnb.DefaultWeightOnlyQuantConfig(block_size=group, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                            quant_format=QuantFormat.QOperator, op_types_to_quantize=ops,
                                            quant_axes=axes)


def run_quantizer(model, bits: int, group: int, cfg, include: list[str] | None = None,
                  exclude: list[str] | None = None):
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    if hasattr(cfg, "bits"):
        cfg.bits = bits
    q = mnb.MatMulNBitsQuantizer(model, bits=bits, block_size=group, is_symmetric=True,
                                 accuracy_level=ACCURACY_LEVEL, nodes_to_include=include, nodes_to_exclude=exclude,
                                 op_types_to_quantize=getattr(cfg, "op_types_to_quantize", None),
                                 quant_axes=getattr(cfg, "quant_axes", None), algo_config=cfg)
    q.process()
    return q.model.model


# ONNX through ONNX Runtime GenAI's model builder: the builder writes its own graph for the model
# (fused GroupQueryAttention and rotary embedding, MatMulNBits int4), which ONNX Runtime runs markedly
# faster than optimum's exported graph (benchmarks/runtimes.py: int4 ~120 vs ~87 tok/s here, the same
# through farm's session loop as through GenAI's own generator — the gain is the graph, not the loop).
#
# Levels: fp32; int4 (`group_size` weights per scale, symmetric, int8 activations). The builder also
# puts the lm_head in 4 bits (embedded model: perplexity 29.8 vs optimum-graph int4's 23.9, where farm
# keeps the lm_head at 8 bits); `int4_tied_embeddings=true` is passed but made no difference with
# builder 0.11.2 (fp32 embedding + 4-bit lm_head, 191 MB). Every level is built from the Hugging Face directory; the runtime is
# farm/runtimes/onnx_rt.py, as for optimum's ONNX.
def build_genai(source: Path, params: dict, out_dir: Path, threads: int = 1) -> Path:
    """The `builder: genai` levels of the onnx format (the comment above)."""
    out = out_dir / f"onnx_genai-{params['quant']}"
    cache = out_dir / "builder-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
           "-p", params["quant"], "-e", "cpu", "-c", str(cache)]
    # the builder trusts a model directory's own Python unless told not to (hf_remote defaults to true)
    extra = [f"hf_remote={'true' if trust_remote_code() else 'false'}"]
    if params["quant"] == "int4":
        extra += [f"int4_block_size={params['group_size']}", "int4_accuracy_level=4", "int4_tied_embeddings=true"]
    cmd += ["--extra_options", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = run_tool(cmd, "ONNX Runtime GenAI's model builder", timeout_for_conversion(source), env)
    shutil.rmtree(cache, ignore_errors=True)
    if res.returncode != 0 or not (out / "model.onnx").is_file():
        raise ToolError(f"onnxruntime-genai's model builder failed ({res.returncode}):\n{res.stderr[-3000:]}")
    copy_side_files(source, out)  # config.json beside genai_config.json, for completeness and generate()
    check_complete(out)
    return out


def decode_bytes(path: Path, settings: dict) -> tuple[int, dict]:
    """The bytes a decode step reads (every initializer but a table only gathered from) and the KV cache's shape."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    by_input: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            by_input.setdefault(name, []).append(node)
    total = 0
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if "length" in ext:
            size = int(ext["length"])
        elif init.raw_data:
            size = len(init.raw_data)
        else:
            size = int(np.prod(init.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        users = terminal(init.name, lambda n: [u for o in ([n] if isinstance(n, str) else n.output)
                                                for u in by_input.get(o, [])], lambda n: n.op_type)
        if users and users <= GATHERS:
            continue  # the embedding table: one row per token
        total += size
    past = [i for i in model.graph.input if i.name.startswith("past_key_values")]
    shape = {**hf_shape(path), "kv_bytes": 4}
    if past:
        elem = past[0].type.tensor_type.elem_type
        shape["kv_bytes"] = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize
    return total, shape
