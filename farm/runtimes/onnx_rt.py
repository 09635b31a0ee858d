"""ONNX Runtime serving an exported decoder with past key values (farm/export/onnx_export.py).

The session is driven directly — input ids, attention mask, positions and the past key/value tensors
in, logits and the present key/values out — so that a decode step costs what ONNX Runtime costs, not
what a Python generate loop around it adds (optimum's ORTModelForCausalLM.generate ran this model at
less than half the speed on this machine; benchmarks/runtimes.py compares the two).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from farm.plugin import RuntimeOptions
from farm.runtimes.common import greedy_generate


class Options(RuntimeOptions):
    TITLE = "ONNX Runtime"
    FORMATS = ("onnx",)
    REQUIREMENTS = ("onnxruntime", "transformers", "numpy")
    name: Literal["onnxruntime"]


class OnnxRuntime:
    def __init__(self, path: Path, threads: int, n_ctx: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        self.empty = {}
        for i in self.session.get_inputs():
            if i.name in self.past_names:  # [batch, kv heads, past length, head dim]
                dtype = np.float16 if "float16" in i.type else np.float32
                self.empty[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=dtype)
        self.wants_positions = any(i.name == "position_ids" for i in self.session.get_inputs())
        self.n_ctx = n_ctx
        self.past: dict = {}
        self.length = 0
        self.settings = {"runtime": f"onnxruntime {ort.__version__}", "threads": threads}
        self.tokenizer = None

    def _forward(self, ids: list[int], past: dict, length: int) -> np.ndarray:
        n = len(ids)
        feed = {"input_ids": np.array([ids], dtype=np.int64),
                "attention_mask": np.ones((1, length + n), dtype=np.int64), **past}
        if self.wants_positions:
            feed["position_ids"] = np.arange(length, length + n, dtype=np.int64)[None]
        out = self.session.run(None, feed)
        self.past = {name: t for name, t in zip(self.past_names, out[1:])}
        self.length = length + n
        return out[0][0]

    def logits(self, tokens: list[int]) -> np.ndarray:
        return self._forward(list(tokens), self.empty, 0).astype(np.float32)

    def prefill(self, tokens: list[int]) -> np.ndarray:
        return self._forward(list(tokens), self.empty, 0)[-1].astype(np.float32)

    def step(self, token: int) -> np.ndarray:
        return self._forward([int(token)], self.past, self.length)[-1].astype(np.float32)

    def generate(self, prompt: str, max_tokens: int = 32) -> str:
        return greedy_generate(self, prompt, max_tokens)


def load(path, threads: int = 1, n_ctx: int = 512) -> OnnxRuntime:
    return OnnxRuntime(Path(path), threads, n_ctx)
