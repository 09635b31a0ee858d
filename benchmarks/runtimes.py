"""Is a slow ONNX / OpenVINO cell the runtime or the Python around it? Decode speed of the same model
through farm's direct session loop (what the farm's cells measure), optimum's generate(), and the GenAI
generators (ONNX Runtime GenAI, OpenVINO GenAI's LLMPipeline), on one prompt, greedy, same threads.

    .venv/bin/python benchmarks/runtimes.py --hf DIR --onnx DIR --openvino DIR [--threads 2]

DIR: a Hugging Face checkpoint and the onnx / openvino export directories of a farm sweep (their paths
are in each cell's `farm.artifact_uri` tag). Decode tok/s = (N - 1) / (time of N tokens - time of 1
token), the median of --repeats, so that prefill and set-up cancel out. ONNX Runtime GenAI needs its
own model (its builder fuses attention into GroupQueryAttention); it is built from --hf, int4 block 32
or fp32 as asked. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "Explain in simple words why the sky is blue and why sunsets are red."


def decode_rate(generate, n: int, repeats: int) -> float:
    """generate(k) produces k new tokens; returns the decode tokens/s with prefill cancelled out."""
    generate(n)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(1)
        t1 = time.perf_counter()
        generate(n)
        t2 = time.perf_counter()
        rates.append((n - 1) / ((t2 - t1) - (t1 - t0)))
    return statistics.median(rates)


def farm_loop(fmt: str, path: Path, threads: int, ids: list[int]):
    from farm.export import FORMATS
    from farm.runtimes import load

    rt = load(FORMATS.options(fmt).RUNTIME, path, threads=threads, n_ctx=1024)

    def gen(k: int) -> None:
        tok = int(np.argmax(rt.prefill(ids)))
        for _ in range(k - 1):
            tok = int(np.argmax(rt.step(tok)))
    return gen


def optimum_generate(fmt: str, path: Path, threads: int, ids: list[int]):
    import torch

    torch.set_num_threads(threads)
    if fmt == "onnx":
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        model = ORTModelForCausalLM.from_pretrained(path, session_options=opts, use_cache=True)
    else:
        from optimum.intel import OVModelForCausalLM

        model = OVModelForCausalLM.from_pretrained(path, ov_config={"INFERENCE_NUM_THREADS": threads,
                                                                    "PERFORMANCE_HINT": "LATENCY"}, compile=True)
    x = torch.tensor([ids])

    def gen(k: int) -> None:
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k, do_sample=False)
    return gen


def ort_genai(hf: Path, precision: str, threads: int, ids: list[int], work: Path):
    import onnxruntime_genai as og

    out = work / f"ort-genai-{precision}"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(work / "cache"), "--extra_options", "int4_block_size=32"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip().splitlines()[-1])
    config = og.Config(str(out))
    config.clear_providers()
    model = og.Model(config)

    def gen(k: int) -> None:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + k, min_length=len(ids) + k, do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens(ids)
        while not g.is_done():
            g.generate_next_token()
    return gen


def ov_genai(path: Path, threads: int, ids: list[int], work: Path):
    """LLMPipeline needs OpenVINO tokenizer models beside the IR; they are converted into a copy."""
    import shutil

    import openvino as ov
    import openvino_genai
    from openvino_tokenizers import convert_tokenizer
    from tokenizers import decoders
    from transformers import AutoTokenizer

    copy = work / f"ov-genai-{path.name}"
    shutil.copytree(path, copy, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    # the GGUF-derived tokenizer's decoder is a Llama-style sequence over byte-level BPE, which
    # convert_tokenizer rejects; byte-level alone decodes the same text
    tok.backend_tokenizer.decoder = decoders.ByteLevel()
    encoder, decoder = convert_tokenizer(tok, with_detokenizer=True)
    ov.save_model(encoder, str(copy / "openvino_tokenizer.xml"))
    ov.save_model(decoder, str(copy / "openvino_detokenizer.xml"))
    extra = json_settings(copy)
    pipe = openvino_genai.LLMPipeline(str(copy), "CPU", INFERENCE_NUM_THREADS=threads, **extra)
    prompt = tok.decode(ids)

    def gen(k: int) -> None:
        pipe.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False)
    return gen


def json_settings(path: Path) -> dict:
    import json

    f = path / "farm_runtime.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", type=Path, required=True)
    p.add_argument("--onnx", type=Path, nargs="*", default=[])
    p.add_argument("--openvino", type=Path, nargs="*", default=[])
    p.add_argument("--genai-precision", nargs="*", default=["fp32", "int4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(a.hf)(PROMPT, add_special_tokens=False)["input_ids"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = []
        for d in a.onnx:
            cases += [(f"onnx {d.name}", "farm session loop", lambda d=d: farm_loop("onnx", d, a.threads, ids)),
                      (f"onnx {d.name}", "optimum ORTModelForCausalLM.generate",
                       lambda d=d: optimum_generate("onnx", d, a.threads, ids))]
        for prec in a.genai_precision:
            cases.append((f"onnx (GenAI builder, {prec})", "onnxruntime-genai Generator",
                          lambda prec=prec: ort_genai(a.hf, prec, a.threads, ids, work)))
        for d in a.openvino:
            cases += [(f"openvino {d.name}", "farm infer-request loop", lambda d=d: farm_loop("openvino", d, a.threads, ids)),
                      (f"openvino {d.name}", "optimum OVModelForCausalLM.generate",
                       lambda d=d: optimum_generate("openvino", d, a.threads, ids)),
                      (f"openvino {d.name}", "openvino-genai LLMPipeline", lambda d=d: ov_genai(d, a.threads, ids, work))]
        for model, path, make in cases:
            try:
                rate = f"{decode_rate(make(), a.tokens, a.repeats):.1f}"
            except Exception as e:  # noqa: BLE001 (a path that does not run here is reported, not hidden)
                rate = f"failed: {str(e).strip().splitlines()[-1][:100] if str(e).strip() else type(e).__name__}"
            rows.append((model, path, rate))
            print(f"{model} | {path} | {rate}", file=sys.stderr, flush=True)
    print(f"| model | path | decode tok/s ({a.threads} threads, {len(ids)}-token prompt, {a.tokens} new) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {' | '.join(r)} |")


if __name__ == "__main__":
    main()
