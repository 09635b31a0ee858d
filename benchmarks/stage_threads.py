"""How a heavy build stage scales with the CPUs it reserves (a sweep's `stage_cpus`): one compression
step on the embedded model, run at each thread count in a fresh process, alternating, `--rounds` times.

    .venv/bin/python benchmarks/stage_threads.py --method gptq --threads 1 2 --rounds 2

Prints the seconds of each run and the median per thread count. Nothing else may run on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

STEPS = {"gptq": {"method": "gptq", "grid": "q4_0"}, "awq": {"method": "awq", "grid": "q4_0", "n_grid": 10},
         "prune_layers": {"method": "prune_layers", "drop": 4}}
CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
from farm.compress import run_method
from farm.measure.quality import tokenize_data
from farm.inputs.models import convert_embedded, load_tokenizer
model = convert_embedded("smollm2-135m-instruct")
calib, _ = tokenize_data(load_tokenizer(model), {"files": [], "calib_tokens": 4096, "eval_windows": 1,
                                                  "eval_window_tokens": 64})
step, threads, out = json.loads(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
t0 = time.perf_counter()
info = run_method(step["method"], model, step, calib, out, threads)
print(json.dumps({"seconds": time.perf_counter() - t0, "info": info}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=sorted(STEPS), default="gptq")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    times: dict[int, list[float]] = {t: [] for t in a.threads}
    for rnd in range(a.rounds):
        for t in a.threads:
            with tempfile.TemporaryDirectory() as d:
                env_threads = {"OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
                res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(STEPS[a.method]), str(t), d],
                                     capture_output=True, text=True, env={**os.environ, **env_threads}, check=False)
                if res.returncode:
                    print(res.stderr[-2000:], file=sys.stderr)
                    return 1
                r = json.loads(res.stdout.strip().splitlines()[-1])
                times[t].append(r["seconds"])
                print(f"round {rnd} threads {t}: {r['seconds']:.1f} s", flush=True)
    for t, xs in times.items():
        print(f"{a.method} at {t} thread(s): median {statistics.median(xs):.1f} s over {len(xs)} runs "
              f"({', '.join(f'{x:.1f}' for x in xs)})")
    base = statistics.median(times[a.threads[0]])
    for t in a.threads[1:]:
        print(f"speed-up {a.threads[0]} -> {t} threads: {base / statistics.median(times[t]):.2f}x")
    print(time.strftime("measured %Y-%m-%d %H:%M"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
