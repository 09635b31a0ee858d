"""ONNX Runtime serving an exported decoder with past key values (farm/export/onnx_export.py).

The session is driven directly — input ids, attention mask, positions and the past key/value tensors
in, logits and the present key/values out — so that a decode step costs what ONNX Runtime costs, not
what a Python generate loop around it adds (optimum's ORTModelForCausalLM.generate ran this model at
less than half the speed on this machine; benchmarks/runtimes.py compares the two).

The KV cache stays in ONNX Runtime's own buffers (IOBinding): each step's present key/values are bound
as the next step's past, so a decode step does not copy the whole cache out to numpy and back in, a cost
that grew with the context and would have worked against the ONNX cells only. Only the logits are read.
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
        self.out_names = [o.name for o in self.session.get_outputs()]  # logits, then present.* in past order
        self.past: dict = {}  # past input name -> OrtValue (the previous step's present output)
        self.length = 0
        self.settings = {"runtime": f"onnxruntime {ort.__version__}", "threads": threads,
                         "prefill_logits": "all"}  # the exported graph computes every position's logits
        self.tokenizer = None

    def _forward(self, ids: list[int], past: dict, length: int) -> np.ndarray:
        n = len(ids)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.array([ids], dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, length + n), dtype=np.int64))
        if self.wants_positions:
            binding.bind_cpu_input("position_ids", np.arange(length, length + n, dtype=np.int64)[None])
        for name, value in past.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.out_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        out = binding.get_outputs()
        self.past = dict(zip(self.past_names, out[1:]))
        self.length = length + n
        return out[0].numpy()[0]

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
