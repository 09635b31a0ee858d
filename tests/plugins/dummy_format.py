"""A test-only export format: 'fp32' is a copy of the checkpoint, 'fp16' is made from the fp32 export with
its weights rounded to float16 (stored as float32). Its default runtime is dummy_rt."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from farm.export.common import ExportOptions


class Options(ExportOptions):
    LEVELS = ("fp32", "fp16")
    DIRECT = ("fp32",)
    BASE_LEVEL = "fp32"
    RUNTIME = "dummy_rt"
    format: Literal["dummy"]


def export(source: Path, params: dict, out_dir: Path, threads: int = 1, calib=None) -> Path:
    out = out_dir / f"dummy-{params['quant']}"
    shutil.copytree(source, out)
    if params["quant"] == "fp16":
        from safetensors.torch import load_file, save_file

        for f in out.glob("*.safetensors"):
            save_file({k: v.half().float() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    return out
