"""Exporters: one module per format, each `export(source, quant, out_dir, threads) -> Path`.
The torch format needs no exporter: its artifact is the Hugging Face directory itself."""

from farm.registry import Registry

EXPORTERS = Registry("export format", {"gguf": "farm.export.gguf_export:export"})
