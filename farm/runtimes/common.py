"""What every runtime is (a Protocol) and what runtimes share: greedy generation through prefill/step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Runtime(Protocol):
    """An exported artifact loaded by one runtime, as evaluate, bench and promote use it."""
    path: Path
    tokenizer: Any  # the model's own tokenizer (Hugging Face), loaded on first use where the runtime has none
    settings: dict  # what the runtime ended up running with (version, threads, CPU path ...): logged as tags

    def logits(self, tokens: list[int]) -> np.ndarray:
        """float32 [len(tokens), vocab]: every position of one window, fresh context."""

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """float32 [vocab]: last-position logits, fresh context."""

    def step(self, token: int) -> np.ndarray:
        """float32 [vocab]: one decode step on the current context."""

    def generate(self, prompt: str, max_tokens: int) -> str:
        """Greedy, with the model's own tokenizer."""


def greedy_generate(rt, prompt: str, max_tokens: int) -> str:
    """Greedy decoding through rt.prefill/rt.step, with the tokenizer saved beside the artifact."""
    from farm.inputs.models import load_tokenizer

    if rt.tokenizer is None:
        rt.tokenizer = load_tokenizer(rt.path)
    ids = rt.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out, tok = [], int(np.argmax(rt.prefill(ids)))
    while len(out) < max_tokens and tok != rt.tokenizer.eos_token_id:
        out.append(tok)
        tok = int(np.argmax(rt.step(tok)))
    return rt.tokenizer.decode(out, skip_special_tokens=True)
