"""OpenVINO serving a stateful IR (farm/export/openvino_export.py): the KV cache is the model's state.

The compiled model is driven directly through one infer request — reset_state() starts a fresh
context — with the settings the export asked for (farm_runtime.json: fp32 sets f32 precision) and
the thread count; everything else is OpenVINO's CPU default, which is what a deployment gets. The
settings the compiled model ended up with (inference precision, KV-cache precision) are recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from farm.plugin import RuntimeOptions
from farm.runtimes.common import greedy_generate


class Options(RuntimeOptions):
    TITLE = "OpenVINO"
    FORMATS = ("openvino",)
    REQUIREMENTS = ("openvino", "transformers", "numpy")
    name: Literal["openvino"]


class OpenVinoRuntime:
    def __init__(self, path: Path, threads: int, n_ctx: int):
        import openvino as ov

        self.path = Path(path)
        extra = self.path / "farm_runtime.json"
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  **(json.loads(extra.read_text()) if extra.is_file() else {})}
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(self.path / "openvino_model.xml")), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.settings = {"runtime": f"openvino {ov.__version__}",
                         "prefill_logits": "all"}  # the exported graph computes every position's logits
        for key in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "INFERENCE_NUM_THREADS"):
            try:
                self.settings[key] = str(self.compiled.get_property(key))
            except RuntimeError:
                pass
        self.n_ctx = n_ctx
        self.length = 0
        self.tokenizer = None

    def _forward(self, ids: list[int], fresh: bool) -> np.ndarray:
        if fresh:
            self.request.reset_state()
            self.length = 0
        n = len(ids)
        self.request.infer({"input_ids": np.array([ids], dtype=np.int64),
                            "attention_mask": np.ones((1, self.length + n), dtype=np.int64),
                            "position_ids": np.arange(self.length, self.length + n, dtype=np.int64)[None],
                            "beam_idx": np.zeros(1, dtype=np.int32)})
        self.length += n
        return self.request.get_tensor("logits").data[0]

    def logits(self, tokens: list[int]) -> np.ndarray:
        return np.array(self._forward(list(tokens), True), dtype=np.float32)

    def prefill(self, tokens: list[int]) -> np.ndarray:
        return np.array(self._forward(list(tokens), True)[-1], dtype=np.float32)

    def step(self, token: int) -> np.ndarray:
        return np.array(self._forward([int(token)], False)[-1], dtype=np.float32)

    def generate(self, prompt: str, max_tokens: int = 32) -> str:
        return greedy_generate(self, prompt, max_tokens)


def load(path, threads: int = 1, n_ctx: int = 512) -> OpenVinoRuntime:
    return OpenVinoRuntime(Path(path), threads, n_ctx)
