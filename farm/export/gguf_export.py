"""GGUF export through llama.cpp's own tools: convert_hf_to_gguf.py, then llama_model_quantize.

The converter is taken from the sdist of the *installed* llama-cpp-python version (the wheel has no
converter), so converter, gguf-py and runtime always come from the same llama.cpp commit.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Literal

from farm import storage
from farm.errors import ToolError
from farm.export.common import ExportOptions
from farm.procs import run_tool, timeout_for_conversion

# spec quant level -> llama.cpp ftype name
FTYPES = {
    "F32": "LLAMA_FTYPE_ALL_F32",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


class Options(ExportOptions):
    """llama.cpp's levels: F32/F16/BF16 converted from the checkpoint, the rest quantized from the F16 file."""
    LEVELS = tuple(FTYPES)
    DIRECT = ("F32", "F16", "BF16")
    BASE_LEVEL = "F16"
    FULL_PRECISION = ("F32", "F16", "BF16")
    RUNTIME = "llamacpp"
    format: Literal["gguf"]


MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


SDIST_HASHES = Path(__file__).with_name("llama_cpp_sdist.sha256")  # also read by scripts/build-llama-cpp.sh


def check_sdist(path: Path) -> None:
    """The downloaded sdist is the one pinned in SDIST_HASHES (its code runs: the converter, the build)."""
    pins = dict(reversed(line.split()) for line in SDIST_HASHES.read_text().splitlines() if line.strip())
    if path.name not in pins:
        raise ToolError(f"{path.name} has no pinned sha256 in {SDIST_HASHES}; add the hash PyPI lists for it")
    if storage.sha256(path) != pins[path.name]:
        raise ToolError(f"{path.name}: sha256 {storage.sha256(path)} is not the pinned {pins[path.name]} "
                        f"({SDIST_HASHES}); not running its code")


def converter_dir() -> Path:
    """llama.cpp's converter for the installed llama-cpp-python, fetched once from its sdist."""
    ver = llama_cpp_version()
    final = storage.home() / "tools" / f"llama.cpp-convert-{ver}-lora"  # -lora: an extraction with the adapter converter
    if (final / "convert_lora_to_gguf.py").is_file():
        return final
    with tempfile.TemporaryDirectory() as dl:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", dl,
               f"llama-cpp-python=={ver}"]
        res = run_tool(cmd, "pip download of the llama-cpp-python sdist", 1800)
        sdists = list(Path(dl).glob("*.tar.gz"))
        if res.returncode != 0 or not sdists:
            raise ToolError(f"could not download the llama-cpp-python {ver} sdist for its converter:\n{res.stderr}")
        check_sdist(sdists[0])
        with storage.publishing(final) as tmp, tarfile.open(sdists[0]) as tar:
            prefix = f"{sdists[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(MEMBERS)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
    return final


def convert(model_dir: Path, out: Path, outtype: str) -> None:
    conv = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)]),
           "NO_LOCAL_GGUF": ""}
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
           "--outtype", outtype.lower()]
    res = run_tool(cmd, "llama.cpp's convert_hf_to_gguf.py", timeout_for_conversion(model_dir), env)
    if res.returncode != 0 or not out.is_file():
        raise ToolError(f"convert_hf_to_gguf.py failed ({res.returncode}):\n{res.stderr[-3000:]}")


def convert_adapter(adapter_dir: Path, base_dir: Path, out: Path, outtype: str = "f16") -> None:
    """A peft LoRA adapter (adapter_config.json + adapter_model.safetensors) as a GGUF adapter for llama.cpp
    (`--lora` of llama-server, `lora_path` of llama-cpp-python), by llama.cpp's convert_lora_to_gguf.py; the
    base model's directory gives the architecture (nothing is looked up on a hub)."""
    conv = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)]), "NO_LOCAL_GGUF": "",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(conv / "convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(base_dir),
           "--outfile", str(out), "--outtype", outtype]
    res = run_tool(cmd, "llama.cpp's convert_lora_to_gguf.py", timeout_for_conversion(adapter_dir), env)
    if res.returncode != 0 or not out.is_file():
        raise ToolError(f"convert_lora_to_gguf.py failed ({res.returncode}):\n{res.stderr[-3000:]}")


def quantize(src: Path, out: Path, level: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[level])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise ToolError(f"llama_model_quantize to {level} failed (rc={rc})")


def export(source: Path, params: dict, out_dir: Path, threads: int = 1, calib=None) -> Path:
    """source: a Hugging Face directory (F32/F16/BF16) or an F16 GGUF file (other levels)."""
    quant = params["quant"]
    out = out_dir / f"model-{quant}.gguf"
    if source.is_dir():
        convert(source, out, quant)
    else:
        quantize(source, out, quant, threads)
    return out


def orderings(levels: dict[str, dict], where: str) -> list[dict]:
    """What the field knows of these levels, checked on one pipeline's cells (the report's ordering checks):
    F16 ~ Q8_0 < Q4_K_M in perplexity and KL, and Q8_0 within 1 % of F16's perplexity. levels: quant -> row."""
    out = []
    f16, q8, q4 = levels.get("F16"), levels.get("Q8_0"), levels.get("Q4_K_M")
    for metric in ("perplexity", "kl_div"):
        if f16 and q8 and q4 and all(metric in r["metrics"] for r in (f16, q8, q4)):
            a, b, c = (r["metrics"][metric] for r in (f16, q8, q4))
            ok = b < c and (metric != "perplexity" or a < c)
            out.append({"check": f"{metric}: F16 ~ Q8_0 < Q4_K_M", "cells": where, "ok": ok,
                        "detail": f"F16 {a:.4g}, Q8_0 {b:.4g}, Q4_K_M {c:.4g}"})
    if f16 and q8 and "perplexity" in f16["metrics"] and "perplexity" in q8["metrics"]:
        a, b = f16["metrics"]["perplexity"], q8["metrics"]["perplexity"]
        out.append({"check": "perplexity: Q8_0 within 1 % of F16", "cells": where, "ok": abs(b / a - 1) <= 0.01,
                    "detail": f"Q8_0 / F16 = {b / a:.4f}"})
    return out


def decode_bytes(path: Path, settings: dict) -> tuple[int, dict]:
    """The bytes a decode step reads (every tensor but an untied embedding table) and the KV cache's shape."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    tensors = {t.name: int(t.n_bytes) for t in r.tensors}
    if "output.weight" in tensors:  # an untied lm_head: the embedding table is only gathered from
        tensors.pop("token_embd.weight", None)
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")

    def field(name):
        f = r.fields.get(f"{arch}.{name}")
        return None if f is None else int(f.parts[-1][0])
    heads, kv = field("attention.head_count"), field("attention.head_count_kv")
    head_dim = field("attention.key_length") or (field("embedding_length") // heads if heads else None)
    shape = {"layers": field("block_count"), "kv_heads": kv or heads, "head_dim": head_dim, "kv_bytes": 2}
    return sum(tensors.values()), shape  # llama.cpp's default KV cache type is f16
