"""Export formats: one module per format, each defining

    class Options(farm.export.common.ExportOptions)  # format: Literal["<name>"]; LEVELS, DIRECT, BASE_LEVEL,
                                                     # RUNTIMES and the options its levels read
    export(source: Path, params: dict, out_dir: Path, threads: int, calib) -> Path

(params: one export variant — format, quant and what that level reads; calib: calibration token ids for
data-aware algorithms, else None). The torch format's fp32 level needs no exporter: its artifact is the
Hugging Face directory itself. Adding a format: one module here, one line below, one test.
"""

from farm.registry import Registry

FORMATS = Registry("export format", {
    "gguf": "farm.export.gguf_export",
    "onnx": "farm.export.onnx_export",
    "openvino": "farm.export.openvino_export",
    "torch": "farm.export.torch_export",  # bitsandbytes levels; fp32 is the checkpoint itself
}, base="farm.export.common:ExportOptions", key="format", needs=("export",), plugin_kind="format")

# every sweep's reference cell: the base model in PyTorch, fp32 (its artifact is the checkpoint itself)
BASELINE = {"format": "torch", "quant": "fp32"}
