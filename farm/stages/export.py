"""One export (farm/export: a format per module) at one quantization level; the artifact's size and checksum."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from farm import storage
from farm.stages.common import model_dir, threads_here

KIND = "export"
PATHS = ("artifact",)


def code(params: dict) -> list[str]:
    from farm.export import FORMATS

    return [FORMATS.module_name(params["format"])]


def run(stage, deps: list[dict], out: Path) -> dict:
    """The artifact is kept relative to the stage's directory; a format may instead name its source itself (the
    torch format's fp32 level: the Hugging Face directory), recorded with its checksum like every artifact."""
    from farm.export import FORMATS

    params, src = stage.params, deps[0]
    source = Path(src["artifact"]) if "artifact" in src else model_dir(src)
    calib = np.load(Path(deps[1]["reference_dir"]) / "calib_tokens.npy") if len(deps) > 1 else None
    options = FORMATS.options(params["format"])
    path = FORMATS.get(params["format"]).export(source, params, out, threads_here(), calib)
    fidelity = {}
    if params["quant"] in options.FULL_PRECISION and "artifact" not in src:  # made from a checkpoint: the same model?
        from farm.measure.fidelity import check

        fidelity = check(source, {"name": options.RUNTIME}, path, Path(deps[1]["reference_dir"]), threads_here(), out,
                         f"{params['format']} {params['quant']}")
    inside = path.resolve().parent == out.resolve()
    return {**params, "artifact": path.name if inside else str(path), "size_mb": storage.size_mb(path),
            "sha256": storage.sha256(path), **fidelity}


def label(params: dict) -> str:
    return f"export {params['format']} {params['quant']}"
