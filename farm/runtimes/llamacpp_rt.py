"""llama.cpp (llama-cpp-python) serving a GGUF file."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class LlamaCppRuntime:
    def __init__(self, path: Path, threads: int, n_ctx: int, logits_all: bool = True):
        from llama_cpp import Llama

        self.path = Path(path)
        self.n_ctx = n_ctx
        self.llm = Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
            n_threads_batch=threads, logits_all=logits_all, verbose=False, seed=0,
        )
        self.vocab = self.llm.n_vocab()

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(tokens))
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


def load(path, threads: int = 1, n_ctx: int = 512) -> LlamaCppRuntime:
    return LlamaCppRuntime(Path(path), threads, n_ctx)
