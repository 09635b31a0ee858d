"""ONNX through ONNX Runtime GenAI's model builder: the builder writes its own graph for the model
(fused GroupQueryAttention and rotary embedding, MatMulNBits int4), which ONNX Runtime runs markedly
faster than optimum's exported graph (benchmarks/runtimes.py: int4 ~120 vs ~87 tok/s here, the same
through farm's session loop as through GenAI's own generator — the gain is the graph, not the loop).

Levels: fp32; int4 (`group_size` weights per scale, symmetric, int8 activations). The builder also
puts the lm_head in 4 bits (embedded model: perplexity 29.8 vs optimum-graph int4's 23.9, where farm
keeps the lm_head at 8 bits); `int4_tied_embeddings=true` is passed but made no difference with
builder 0.11.2 (fp32 embedding + 4-bit lm_head, 191 MB). Every level is built from the Hugging Face directory; the runtime is
farm/runtimes/onnx_rt.py, as for optimum's ONNX.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from farm.errors import ToolError
from farm.export.common import copy_side_files
from farm.export.onnx_export import check_complete


def build(source: Path, params: dict, out_dir: Path, threads: int = 1) -> Path:
    """The `builder: genai` levels of the onnx format (farm/export/onnx_export.py)."""
    out = out_dir / f"onnx_genai-{params['quant']}"
    cache = out_dir / "builder-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
           "-p", params["quant"], "-e", "cpu", "-c", str(cache)]
    if params["quant"] == "int4":
        cmd += ["--extra_options", f"int4_block_size={params['group_size']}", "int4_accuracy_level=4",
                "int4_tied_embeddings=true"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    shutil.rmtree(cache, ignore_errors=True)
    if res.returncode != 0 or not (out / "model.onnx").is_file():
        raise ToolError(f"onnxruntime-genai's model builder failed ({res.returncode}):\n{res.stderr[-3000:]}")
    copy_side_files(source, out)  # config.json beside genai_config.json, for completeness and generate()
    check_complete(out)
    return out
