"""Runtimes that run an exported artifact, keyed by their own name; a runtime lists the formats it can load
(Options.FORMATS), a format names its default runtime (farm/export/<format>_export.py). Each module defines

    class Options(farm.plugin.RuntimeOptions)  # name: Literal["<name>"], FORMATS, REQUIREMENTS, its options
    load(path, threads, n_ctx, **options) -> farm.runtimes.common.Runtime

    rt.logits(tokens)   -> float32 [len(tokens), vocab]: every position of one window, fresh context
    rt.prefill(tokens)  -> float32 [vocab]: last-position logits, fresh context
    rt.step(token)      -> float32 [vocab]: one decode step on the current context
    rt.generate(prompt, max_tokens) -> str, greedy, with the model's own tokenizer

Adding a runtime: one module here, one line below, one test.
"""

from farm.registry import Registry

RUNTIMES = Registry("runtime", {
    "llamacpp": "farm.runtimes.llamacpp_rt",
    "onnxruntime": "farm.runtimes.onnx_rt",
    "openvino": "farm.runtimes.openvino_rt",
    "torch": "farm.runtimes.torch_rt",
}, base="farm.plugin:RuntimeOptions", key="name", needs=("load",), plugin_kind="runtime")


def runtimes_for(fmt: str) -> tuple[str, ...]:
    return tuple(n for n in RUNTIMES.names() if fmt in RUNTIMES.options(n).FORMATS)


def load(runtime: str | dict, path, threads: int, n_ctx: int):
    """runtime: a name, or {'name': ..., <its options>} as an export's runtime setting holds it."""
    spec = {"name": runtime} if isinstance(runtime, str) else dict(runtime)
    module = RUNTIMES.get(spec["name"])
    options = module.Options.model_validate(spec).model_dump(exclude={"name"})
    return module.load(path, threads=threads, n_ctx=n_ctx, **options)
