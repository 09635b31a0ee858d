"""What an unmerged LoRA adapter costs when served: llama-server with the merged model's GGUF against the base
model's GGUF with the adapter(s) loaded (`--lora`, as `farm serve --lora` runs it), under the serve benchmark's
own load generator (farm/serve/loadgen.py) at each concurrency. With several adapters, the requests of one
level are spread over them round-robin (per-user assistants on one CPU box): llama-server batches only requests
with the same adapters, so mixed adapters also cost batching.

    .venv/bin/python benchmarks/adapters.py --merged M.gguf --base B.gguf --adapter A.gguf [--adapter A2.gguf] \\
        --tokenizer MODEL_DIR [--concurrency 1 4] [--threads 2] [--rounds 3] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from statistics import median

from farm.inputs.data import split
from farm.inputs.models import load_tokenizer
from farm.nodes import facts
from farm.serve.llamacpp_server import server
from farm.serve.loadgen import prompts_from_ids, run_level


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merged", type=Path, required=True)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, action="append", required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--requests-per-stream", type=int, default=4,
                    help="requests at each level = this x concurrency (at least 8)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/adapters.md")
    a = ap.parse_args()
    tok = load_tokenizer(a.tokenizer)
    _, text = split([])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_ad = len(a.adapter)
    configs = [("merged", a.merged, [], None),
               ("base + 1 adapter", a.base, a.adapter[:1], lambda i: {"lora": [{"id": 0, "scale": 1.0}]})]
    if n_ad > 1:
        configs.append((f"base + {n_ad} adapters, round-robin", a.base, a.adapter,
                        lambda i: {"lora": [{"id": i % n_ad, "scale": 1.0}]}))
    configs.append(("base alone", a.base, [], None))
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(a.rounds):  # rounds interleave the configurations, so a drift of the machine hits all alike
        for name, gguf, lora, extra in configs:
            with tempfile.TemporaryDirectory() as d, server(gguf, Path(d), a.threads, max(a.concurrency),
                                                            512 * max(a.concurrency), lora=lora,
                                                            lora_applied=False) as srv:
                offset = 0  # every configuration is timed on the same prompts
                for c in a.concurrency:
                    n = max(8, a.requests_per_stream * c)
                    prompts = prompts_from_ids(ids, tok.decode, n, a.prompt_tokens, 0, offset)
                    offset += n * a.prompt_tokens
                    run_level(srv.url, gguf.stem, prompts[:1], 1, 4, extra=extra)  # warm-up
                    r = run_level(srv.url, gguf.stem, prompts, c, a.output_tokens, extra=extra)
                    runs.setdefault((name, c), []).append(r)
                    print(name, c, {k: round(r[k], 1) for k in ("output_tok_s", "ttft_p50_ms", "itl_p50_ms")},
                          flush=True)
    f = facts()
    same = (" The adapters are one file loaded under several ids: each id is its own adapter to llama-server."
            if len({p.resolve() for p in a.adapter}) < n_ad else "")
    cpu = f"{f['model_name']}, {f['family']}, {f['isa']}"
    lines = [(f"# Serving a LoRA adapter unmerged vs merged (llama-server, {a.threads} threads, prompt "
              f"{a.prompt_tokens} / output {a.output_tokens} tokens, {cpu})"), "",
             f"merged: `{a.merged.name}`; base: `{a.base.name}`; adapters: {', '.join(p.name for p in a.adapter)}", "",
             f"Median of {a.rounds} interleaved rounds (output tok/s: min-max in brackets)." + same, "",
             "| served | concurrency | output tok/s | TTFT p50 ms | ITL p50 ms |", "|---|---|---|---|---|"]
    for (name, c), rs in runs.items():
        tps = [r["output_tok_s"] for r in rs]
        lines.append(f"| {name} | {c} | {median(tps):.1f} [{min(tps):.1f}-{max(tps):.1f}] | "
                     f"{median(r['ttft_p50_ms'] for r in rs):.0f} | {median(r['itl_p50_ms'] for r in rs):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
