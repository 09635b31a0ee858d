"""Serving engines: an exported artifact behind an OpenAI-compatible HTTP API on 127.0.0.1, keyed by the runtime
that measured it (the runtime axis of the sweep). Each module defines

    TITLE, RUNTIME
    server(artifact, workdir, threads, parallel, n_ctx, host=, port=, alias=, **runtime_options) -> common.Server
    settings(server) -> dict          what ran (e.g. the CPU backend), recorded as farm.serve.* tags
    async counters(url) -> dict       the engine's own counters: prompt tokens, cached prompt tokens, decodes...

Formats without an engine here (ONNX Runtime, ONNX Runtime GenAI, PyTorch) are not served: see README
"Serving" for why.
"""

from __future__ import annotations

import importlib

ENGINES = {
    "llamacpp": "farm.serve.llamacpp_server",  # GGUF: llama.cpp's llama-server
    "openvino": "farm.serve.openvino_server",  # OpenVINO IR: openvino-genai's ContinuousBatchingPipeline
}


def engine(runtime: str):
    if runtime not in ENGINES:
        raise KeyError(f"no serving engine for runtime '{runtime}' (engines: {', '.join(ENGINES)})")
    return importlib.import_module(ENGINES[runtime])
