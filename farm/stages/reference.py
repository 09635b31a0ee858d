"""The reference: calibration and evaluation text tokenized once, and the base model's logits on the evaluation
windows (what every cell's KL divergence and top-1 agreement are measured against). Reads the sweep's `data`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from farm.plugin import Strict
from farm.stages.common import model_dir, threads_here

KIND = "reference"
SECTION = "data"
PATHS = ("reference_dir",)


class DataSpec(Strict):
    files: list[str] = Field(
        default_factory=list,
        description="Your own UTF-8 text files; empty means the embedded corpus (Python's pydoc topics).",
    )
    calib_tokens: int = Field(4096, ge=256, le=1_000_000, description="Tokens of calibration text.")
    eval_windows: int = Field(4, ge=1, le=512, description="Evaluation windows (disjoint from calibration).")
    eval_window_tokens: int = Field(256, ge=16, le=8192, description="Tokens per evaluation window.")
    long_window_tokens: int = Field(
        0, ge=0, le=32768, description="The long-context probe: windows of this many tokens (e.g. 2048, within the "
        "model's context) whose perplexity every cell reports near their start (perplexity_near, the first "
        "eval_window_tokens positions) and far into them (perplexity_far, the second half); 0: no probe.")
    long_windows: int = Field(2, ge=1, le=64, description="Windows of the long-context probe.")

    @model_validator(mode="after")
    def _long(self) -> DataSpec:
        if self.long_window_tokens and self.long_window_tokens < 2 * self.eval_window_tokens:
            raise ValueError(f"long_window_tokens ({self.long_window_tokens}) must be at least twice "
                             f"eval_window_tokens ({self.eval_window_tokens}): its far half starts after the near part")
        return self


Config = DataSpec  # the section's model, as every stage kind names it


def code(params: dict) -> list[str]:
    return ["farm.measure.quality"]


def run(stage, deps: list[dict], out: Path) -> dict:
    from farm.measure.quality import build_reference

    info = build_reference(model_dir(deps[0]), stage.params["data"], out, threads_here())
    return {**info, "reference_dir": "."}
