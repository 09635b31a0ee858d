"""PyTorch eager fp32 serving a Hugging Face directory: the baseline every sweep includes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from farm.plugin import RuntimeOptions


class Options(RuntimeOptions):
    TITLE = "PyTorch"
    FORMATS = ("torch",)
    REQUIREMENTS = ("torch", "transformers")
    name: Literal["torch"]


class TorchRuntime:
    def __init__(self, path: Path, threads: int, n_ctx: int):
        import torch

        from farm.inputs.models import load_model, load_tokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_model(path)
        self.tokenizer = load_tokenizer(path)
        self.n_ctx = n_ctx
        self.past = None
        self.settings = {"runtime": f"torch {torch.__version__}", "threads": threads, "prefill_logits": "last"}

    def _forward(self, ids: list[int], past=None, last_only: bool = False):
        kw = {"logits_to_keep": 1} if last_only else {}  # a prefill computes the last position's logits only
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([ids]), past_key_values=past, use_cache=True, **kw)
        return out.logits[0].float().numpy(), out.past_key_values

    def logits(self, tokens: list[int]) -> np.ndarray:
        logits, _ = self._forward(list(tokens))
        return logits

    def prefill(self, tokens: list[int]) -> np.ndarray:
        logits, self.past = self._forward(list(tokens), last_only=True)
        return logits[-1]

    def step(self, token: int) -> np.ndarray:
        logits, self.past = self._forward([int(token)], self.past)
        return logits[-1]

    def generate(self, prompt: str, max_tokens: int = 32) -> str:
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=max_tokens,
                                      do_sample=False)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def load(path, threads: int = 1, n_ctx: int = 512) -> TorchRuntime:
    return TorchRuntime(Path(path), threads, n_ctx)
