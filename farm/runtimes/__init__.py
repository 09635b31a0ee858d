"""Runtimes that serve an exported artifact, all with one interface:

    rt = load(path, threads=2, n_ctx=512)
    rt.logits(tokens)   -> float32 [len(tokens), vocab]: every position of one window, fresh context
    rt.prefill(tokens)  -> float32 [vocab]: last-position logits, fresh context
    rt.step(token)      -> float32 [vocab]: one decode step on the current context
    rt.generate(prompt, max_tokens) -> str, greedy, with the model's own tokenizer

One module per runtime; the format of an export picks its runtime.
"""

from farm.registry import Registry

RUNTIMES = Registry(
    "runtime",
    {
        "gguf": "farm.runtimes.llamacpp_rt:load",
        "onnx": "farm.runtimes.onnx_rt:load",
        "onnx_genai": "farm.runtimes.onnx_rt:load",  # the same runtime; the builder's graph
        "openvino": "farm.runtimes.openvino_rt:load",
        "torch": "farm.runtimes.torch_rt:load",
    },
)


def load(fmt: str, path, threads: int, n_ctx: int, options: dict | None = None):
    """options: the runtime's own settings from the export spec (gguf: amx, repack)."""
    return RUNTIMES.get(fmt)(path, threads=threads, n_ctx=n_ctx, **(options or {}))


def greedy_generate(rt, prompt: str, max_tokens: int) -> str:
    """Greedy decoding through rt.prefill/rt.step, with the tokenizer saved beside the artifact."""
    import numpy as np

    from farm.models import load_tokenizer

    if rt.tokenizer is None:
        rt.tokenizer = load_tokenizer(rt.path)
    ids = rt.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out, tok = [], int(np.argmax(rt.prefill(ids)))
    while len(out) < max_tokens and tok != rt.tokenizer.eos_token_id:
        out.append(tok)
        tok = int(np.argmax(rt.step(tok)))
    return rt.tokenizer.decode(out, skip_special_tokens=True)
