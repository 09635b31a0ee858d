"""A test-only runtime: PyTorch underneath, its logits multiplied by `scale` (an option that reaches it
from the sweep). It runs the dummy format and the torch format, so one export is served by two runtimes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from farm.plugin import RuntimeOptions


class Options(RuntimeOptions):
    TITLE = "dummy runtime"
    FORMATS = ("dummy", "torch")
    REQUIREMENTS = ("torch",)
    GRID = ("scale",)
    TAGS = {"scale": "x{scale}"}
    name: Literal["dummy_rt"]
    scale: float | list[float] = Field(1.0, description="Logits are multiplied by this.")


class Scaled:
    def __init__(self, rt, scale: float):
        self.rt, self.scale = rt, scale
        self.path, self.tokenizer, self.settings = rt.path, rt.tokenizer, {"runtime": "dummy", "scale": scale}

    def logits(self, tokens):
        return self.rt.logits(tokens) * self.scale

    def prefill(self, tokens):
        return self.rt.prefill(tokens) * self.scale

    def step(self, token):
        return self.rt.step(token) * self.scale

    def generate(self, prompt, max_tokens):
        return self.rt.generate(prompt, max_tokens)


def load(path, threads: int = 1, n_ctx: int = 512, scale: float = 1.0):
    from farm.runtimes.torch_rt import load as torch_load

    rt = torch_load(path, threads=threads, n_ctx=n_ctx)
    rt.path = path
    return Scaled(rt, scale)
