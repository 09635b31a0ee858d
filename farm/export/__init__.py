"""Exporters: one module per format, each `export(source, params, out_dir, threads, calib) -> Path`
(params: the export variant — format, quant and the options that level reads; calib: calibration token
ids for data-aware algorithms, else None).
The torch format's fp32 level needs no exporter: its artifact is the Hugging Face directory itself."""

from farm.registry import Registry

EXPORTERS = Registry("export format", {
    "gguf": "farm.export.gguf_export:export",
    "onnx": "farm.export.onnx_export:export",
    "onnx_genai": "farm.export.onnx_genai_export:export",
    "openvino": "farm.export.openvino_export:export",
    "torch": "farm.export.torch_export:export",  # bitsandbytes levels; fp32 is the checkpoint itself
})
