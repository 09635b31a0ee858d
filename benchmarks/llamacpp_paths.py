"""Which llama.cpp CPU path is fastest here? The same GGUF files through each CPU-variant library of the
multi-variant build, with the repack buffers on and off (and AMX, where the CPU has it), each in a fresh
process by farm's own benchmark (farm/bench.py: pinned threads, warm-up, median of repeats).

    .venv/bin/python benchmarks/llamacpp_paths.py --reference STAGE_DIR F16.gguf Q8_0.gguf ... \
        [--variants zen4,skylakex,haswell] [--threads 2]

STAGE_DIR: a sweep's reference stage directory (its eval/calib token ids give the prompt). Prints a
markdown table of decode and prefill tokens/s per file and path: the median over --rounds passes, each
pass through every path in turn, so that the machine's drift hits every path alike. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from farm.measure import speed as bench
from farm.runtimes import ggml_cpu

SETTINGS = {"prompt_tokens": 128, "decode_tokens": 64, "warmup": 1, "repeats": 3}


def paths(variants: list[str], scores: dict[str, int]) -> list[tuple[str, bool, bool]]:
    """(variant, amx, repack) to measure: each variant with repack on and off; AMX where it can run."""
    out = [(v, False, r) for v in variants for r in (True, False)]
    out += [(v, True, True) for v in ggml_cpu.AMX_VARIANTS if scores.get(v, 0) > 0]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", nargs="+", type=Path)
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("--variants", default="", help="comma-separated; default: the chosen one, skylakex, haswell")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rounds", type=int, default=3, help="passes through every path (interleaved against drift)")
    p.add_argument("--native-site", type=Path, help="a directory holding a native (GGML_NATIVE) llama_cpp "
                   "package (pip install --target): measured too, for comparison with the multi-variant build")
    a = p.parse_args()
    scores = {v: ggml_cpu.score(path) for v, path in ggml_cpu.variants().items()}
    best = ggml_cpu.choose(scores, amx=False)
    variants = a.variants.split(",") if a.variants else list(dict.fromkeys([best, "skylakex", "haswell"]))
    variants = [v for v in variants if scores.get(v, 0) > 0]
    todo = paths(variants, scores) + ([("native", False, True), ("native", False, False)] if a.native_site else [])
    results: dict[tuple, list] = {}
    with tempfile.TemporaryDirectory() as d:
        for rnd, f, (variant, amx, repack) in [(r, f, t) for r in range(a.rounds) for f in a.gguf for t in todo]:
            if variant == "native":  # the native package shadows the installed one in the child
                os.environ.pop("FARM_GGML_CPU_VARIANT", None)
                os.environ["PYTHONPATH"] = str(a.native_site)
            else:
                os.environ.pop("PYTHONPATH", None)
                os.environ["FARM_GGML_CPU_VARIANT"] = variant
            out = Path(d) / "bench.json"
            key = (f.name, variant, amx, repack)
            try:
                r = bench.run({"name": "llamacpp", "amx": amx, "repack": repack}, f, a.reference, SETTINGS, a.threads, out,
                              f"gguf {f.name}")
                ran = r["runtime_settings"]
                results.setdefault(key, []).append((r["decode_tok_s"], r["prefill_tok_s"], ran["cpu_variant"],
                                                    r["contaminated"]))
            except Exception as e:  # noqa: BLE001 (a crash is a result here: print it)
                results.setdefault(key, []).append((float("nan"), float("nan"), str(e).splitlines()[0][:120], False))
            print(json.dumps({"round": rnd, "key": key, "result": results[key][-1]}), flush=True)
    print(f"\nCPU variants scored here: {scores}; {a.rounds} rounds, each through every path in turn\n")
    print("| file | variant (as loaded) | AMX | repack | decode tok/s median (min–max) | prefill tok/s median (min–max) |")
    print("|---|---|---|---|---|---|")
    for (name, variant, amx, repack), got in results.items():
        dec, pre = [g[0] for g in got], [g[1] for g in got]
        loaded = ",".join(sorted({g[2] for g in got}))
        flag = " (contaminated)" if any(g[3] for g in got) else ""
        print(f"| {name} | {variant} ({loaded}) | {'on' if amx else 'off'} | {'on' if repack else 'off'} | "
              f"{statistics.median(dec):.1f} ({min(dec):.0f}–{max(dec):.0f}){flag} | "
              f"{statistics.median(pre):.0f} ({min(pre):.0f}–{max(pre):.0f}) |")


if __name__ == "__main__":
    main()
