"""llama.cpp (llama-cpp-python) serving a GGUF file.

Options (an export's `runtime: {name: llamacpp, amx: ..., repack: ...}`, passed by the evaluate and bench stages):
  amx     run llama.cpp's AMX kernels where the CPU has them (default off: they crashed every quantized
          model on the AMX Xeons seen here; see farm/runtimes/ggml_cpu.py)
  repack  the CPU's extra buffer types, which repack Q4_0/IQ4_NL weights for faster kernels (default on)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from farm.plugin import BoolGrid, RuntimeOptions


class Options(RuntimeOptions):
    TITLE = "llama.cpp"
    FORMATS = ("gguf",)
    REQUIREMENTS = ("llama-cpp-python", "numpy")
    GRID = ("amx", "repack")
    TAGS = {"amx": "amx", "repack": "norepack"}
    name: Literal["llamacpp"]
    amx: BoolGrid = Field(
        False, description="Run llama.cpp's AMX kernels where the CPU has them (off by default: they crashed "
        "quantized models on the AMX Xeons seen so far); [false, true] measures both.")
    repack: BoolGrid = Field(
        True, description="llama.cpp's CPU extra buffers (weight repacking, e.g. Q4_0 8x8); a list is a grid.")


@contextlib.contextmanager
def _model_params(use_extra_bufts: bool):
    """llama-cpp-python's Llama() does not expose use_extra_bufts; it reads llama_model_default_params(),
    so that one call is wrapped while the model loads."""
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = use_extra_bufts
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = original


class LlamaCppRuntime:
    """Every position's logits only where they are read (logits(), for evaluation): the context is made with
    room for them (logits_all=True sizes llama-cpp-python's score buffer), but prefill and step ask llama.cpp
    for the last position only (Llama._logits_all, which eval() reads per call), as a serving engine does —
    computing and copying a 49k-vocabulary row for every prompt token cost 41 % of prefill speed."""

    def __init__(self, path: Path, threads: int, n_ctx: int, amx: bool = False, repack: bool = True):
        from llama_cpp import Llama

        from farm.runtimes import ggml_cpu

        chosen = ggml_cpu.select(amx)
        extra_bufts = repack
        if chosen["cpu_variant"] == "static" and not amx and ggml_cpu.system_features().get("AMX_INT8") == "1":
            extra_bufts = False  # a native build with AMX compiled in: extra buffers off is the only way out
        self.path = Path(path)
        self.n_ctx = n_ctx
        with _model_params(extra_bufts):
            self.llm = Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False, seed=0,
            )
        self.llm._logits_all = False
        self.vocab = self.llm.n_vocab()
        self.settings = {"runtime": "llama.cpp", "threads": threads, "prefill_logits": "last",
                         **ggml_cpu.settings(amx, extra_bufts)}

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm._logits_all = True
        try:
            self.llm.eval(list(tokens))
        finally:
            self.llm._logits_all = False
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def _last(self) -> np.ndarray:
        ptr = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab,)).copy()

    def prefill(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(tokens))
        return self._last()

    def step(self, token: int) -> np.ndarray:
        self.llm.eval([int(token)])
        return self._last()

    def generate(self, prompt: str, max_tokens: int = 32) -> str:
        self.llm.reset()
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
        return out["choices"][0]["text"]


def load(path, threads: int = 1, n_ctx: int = 512, amx: bool = False, repack: bool = True) -> LlamaCppRuntime:
    return LlamaCppRuntime(Path(path), threads, n_ctx, amx=amx, repack=repack)
