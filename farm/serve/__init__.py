"""Serving engines: an exported artifact behind an OpenAI-compatible HTTP API on 127.0.0.1, keyed by the runtime
that measured it (the runtime axis of the sweep); a registry like every plug-in's (FARM_PLUGINS="engine:NAME=MODULE"
adds one from outside farm/). Each module defines

    TITLE, RUNTIME, ADAPTERS (optional: True if it serves LoRA adapters unmerged, `lora=` of server)
    server(artifact, workdir, threads, parallel, n_ctx, host=, port=, alias=, **runtime_options) -> common.Server
    settings(server) -> dict          what ran (e.g. the CPU backend), recorded as farm.serve.* tags
    async counters(url) -> dict       the engine's own counters: prompt tokens, cached prompt tokens, decodes...

Formats without an engine here (ONNX Runtime, ONNX Runtime GenAI, PyTorch) are not served: docs/serving.md says
why.
"""

from farm.registry import Registry

ENGINES = Registry("serving engine", {
    "llamacpp": "farm.serve.llamacpp_server",  # GGUF: llama.cpp's llama-server
    "openvino": "farm.serve.openvino_server",  # OpenVINO IR: openvino-genai's ContinuousBatchingPipeline
}, base=None, key=None, needs=("server", "settings", "counters"), plugin_kind="engine")


def engine(runtime: str):
    """The serving engine of a runtime (an unknown one: an error naming the engines there are)."""
    return ENGINES.get(runtime)
