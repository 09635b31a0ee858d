"""Does the farm's benchmark measure what the runtime does? The farm's bench (farm/bench.py, its own process,
as a sweep runs it) side by side with a bare loop over each runtime's own API — llama-cpp-python's Llama.eval,
an onnxruntime session fed numpy arrays, an OpenVINO infer request, a transformers model called with its
past key values — on the same files, prompt tokens, decode length, threads and cores, each in a fresh process,
alternating (and alternating which goes first) so that drift hits both. Then, with --sweep, the same cells'
figures from inside the sweep (MLflow), to show what the sweep's own load costs.

    .venv/bin/python benchmarks/agreement.py --sweep demo [--threads 2] [--rounds 6]
    .venv/bin/python benchmarks/agreement.py --reference DIR gguf=FILE onnx=DIR openvino=DIR

--sweep picks the base model's full-precision and 4-bit cells of every runtime from the sweep's latest run
(MLFLOW_TRACKING_URI, FARM_HOME as `make demo` sets them). Prints a Markdown table and writes it to --out
(default benchmarks/results/agreement.md).

--in-sweep JOB: the in-sweep check, paired in time. The demo's figures were measured up to half an
hour before the quiet ones, and this VM's speed drifts by ±15 % within minutes, so comparing the two mixes drift
with the sweep's own load. Instead, each of --in-sweep-rounds rounds submits JOB (a sweep of the same cells with
`bench.reuse: never`: its benchmarks run inside a Ray job, beside the driver, MLflow and the job log's tail) and
right after benchmarks every cell alone with farm's bench; in-sweep/quiet is the median of the rounds' ratios.

    .venv/bin/python benchmarks/agreement.py --in-sweep jobs/insweep.yaml --in-sweep-rounds 3
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
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results" / "agreement.md"
RUNTIME = {"gguf": {"name": "llamacpp"}, "onnx": {"name": "onnxruntime"}, "openvino": {"name": "openvino"},
           "torch": {"name": "torch"}}


# --- the bare loops: each runtime's own API, nothing of farm's -------------------------------------------

def bare_llamacpp(path: str, threads: int, n_ctx: int):
    import ctypes

    import llama_cpp
    from llama_cpp import Llama

    lib = Path(llama_cpp.__file__).parent / "lib"
    if list(lib.glob("libggml-cpu-*.so")):  # a multi-variant build: ggml's own loader picks the best for this CPU,
        ggml = llama_cpp.llama_cpp._lib  # as llama.cpp's tools do (on an AMX Xeon: the AMX one); through
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]  # libllama's handle (its libggml)
        ggml.ggml_backend_load_all_from_path(str(lib).encode())

    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                n_threads_batch=threads, verbose=False)

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    def step(tok):
        llm.eval([tok])
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return prefill, step


def bare_onnx(path: str, threads: int, n_ctx: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(Path(path) / "model.onnx"), so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values")]
    state = {}

    def run(ids, past, length):
        feed = {"input_ids": np.array([ids], dtype=np.int64),
                "attention_mask": np.ones((1, length + len(ids)), dtype=np.int64), **past}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(length, length + len(ids), dtype=np.int64)[None]
        out = sess.run(None, feed)
        state["past"], state["len"] = dict(zip(past_names, out[1:])), length + len(ids)
        return int(np.argmax(out[0][0, -1]))

    def prefill(ids):
        empty = {n: np.zeros((1, inputs[n].shape[1], 0, inputs[n].shape[3]),
                             dtype=np.float16 if "float16" in inputs[n].type else np.float32) for n in past_names}
        return run(ids, empty, 0)

    def step(tok):
        return run([tok], state["past"], state["len"])
    return prefill, step


def bare_openvino(path: str, threads: int, n_ctx: int):
    import openvino as ov

    core = ov.Core()
    extra = Path(path) / "farm_runtime.json"  # the export's own precision setting (fp32 cells ask for f32)
    cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
           **(json.loads(extra.read_text()) if extra.is_file() else {})}
    req = core.compile_model(str(Path(path) / "openvino_model.xml"), "CPU", cfg).create_infer_request()
    state = {"len": 0}

    def run(ids):
        n, length = len(ids), state["len"]
        req.infer({"input_ids": np.array([ids], dtype=np.int64),
                   "attention_mask": np.ones((1, length + n), dtype=np.int64),
                   "position_ids": np.arange(length, length + n, dtype=np.int64)[None],
                   "beam_idx": np.zeros(1, dtype=np.int32)})
        state["len"] = length + n
        return int(np.argmax(req.get_tensor("logits").data[0, -1]))

    def prefill(ids):
        req.reset_state()
        state["len"] = 0
        return run(ids)
    return prefill, (lambda tok: run([tok]))


def bare_torch(path: str, threads: int, n_ctx: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    state = {}

    @torch.inference_mode()
    def run(ids, past):
        out = model(torch.tensor([ids]), past_key_values=past, use_cache=True)
        state["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    return (lambda ids: run(ids, None)), (lambda tok: run([tok], state["past"]))


BARE = {"gguf": bare_llamacpp, "onnx": bare_onnx, "openvino": bare_openvino, "torch": bare_torch}


def bare_child(a) -> None:
    """In a fresh process: pin to the first --threads cores, time prefill and decode like farm.measure.speed does."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:a.threads])
    ids = json.loads(Path(a.prompt).read_text())
    prefill, step = BARE[a.fmt](a.path, a.threads, len(ids) + a.decode + 8)
    reps = []
    for i in range(a.warmup + a.repeats):
        t0 = time.perf_counter()
        tok = prefill(ids)
        t1 = time.perf_counter()
        for _ in range(a.decode):
            tok = step(tok)
        t2 = time.perf_counter()
        if i >= a.warmup:
            reps.append((len(ids) / (t1 - t0), a.decode / (t2 - t1)))
    Path(a.out).write_text(json.dumps({"prefill_tok_s": statistics.median(r[0] for r in reps),
                                       "decode_tok_s": statistics.median(r[1] for r in reps)}))


# --- the comparison ---------------------------------------------------------------------------------------

def farm_bench(fmt: str, path: str, reference: Path, threads: int, bench: dict, work: Path) -> dict:
    from farm import nodes
    from farm.measure import roofline
    from farm.measure import speed as farmbench

    raw = farmbench.run(RUNTIME[fmt], Path(path), reference, bench, threads, work / "farm.json")
    context = bench["prompt_tokens"] + bench["decode_tokens"] / 2  # as farm's roofline stage reads it
    raw["roofline"] = roofline.for_cell(fmt, Path(path), raw["decode_tok_s"], context, threads, raw["cores"],
                                        raw["runtime_settings"], nodes.facts())
    return raw


def bare(fmt: str, path: str, prompt: Path, threads: int, bench: dict, work: Path) -> dict:
    out = work / "bare.json"
    subprocess.run([sys.executable, __file__, "--bare", fmt, path, "--prompt", str(prompt), "--threads",
                    str(threads), "--decode", str(bench["decode_tokens"]), "--warmup", str(bench["warmup"]),
                    "--repeats", str(bench["repeats"]), "--out", str(out)], check=True)
    return json.loads(out.read_text())


def sweep_cells(name: str) -> tuple[list[tuple[str, str, str, dict]], Path, dict]:
    """(label, format, artifact path, in-sweep metrics) of the base model's full-precision and 4-bit cells."""
    from farm.record import queries
    from farm.storage import local_path

    c, _, parent = queries.latest_sweep_run(name)
    spec = queries.sweep_spec(c, parent)
    wanted = {("torch", "fp32"), ("gguf", "F16"), ("gguf", "Q4_0"), ("onnx", "fp32"), ("onnx", "int4"),
              ("openvino", "fp32"), ("openvino", "int4_asym")}
    cells, reference = [], sweep_reference(c, parent)
    for r in queries.cell_runs(parent):
        p, t = r.data.params, r.data.tags
        key = (p.get("export.format"), p.get("export.quant"))
        if r.info.status != "FINISHED" or p.get("compress.method") != "none" or key not in wanted \
                or p.get("export.builder", "None") not in ("None", "optimum") or "farm.artifact_uri" not in t:
            continue
        if json.loads(t.get("farm.artifact_runtime", "{}")).get("name") != RUNTIME[key[0]]["name"]:
            continue
        cells.append((t["farm.label"], key[0], str(local_path(t["farm.artifact_uri"])), dict(r.data.metrics)))
    return sorted(cells), reference, spec["bench"]


def sweep_reference(c, parent) -> Path:
    """The sweep's own reference stage (its prompt tokens), as the grid recorded on its run names it: a store
    holds every swept model's reference-* stages, and another model's tokens would measure something else."""
    from farm import storage
    from farm.plan.grid import REFERENCE
    from farm.stages.runner import stored_result

    with tempfile.TemporaryDirectory() as d:
        stages = json.loads(Path(c.download_artifacts(parent.info.run_id, "grid.json", d)).read_text())["stages"]
    names = [f"{s['kind']}-{s['id']}" for s in stages if s["kind"] == REFERENCE]
    result = stored_result(names[0]) if len(names) == 1 else None
    if result is None:
        raise SystemExit(f"the sweep's reference stage ({', '.join(names) or 'none recorded'}) is not in the store "
                         f"{storage.url() or storage.root()}: set FARM_STORAGE (or FARM_HOME) to the store the sweep "
                         "used, or run the sweep (make demo) first")
    return Path(result["reference_dir"])


def paired(ratios: list[float]) -> str:
    """The median of the rounds' farm/bare ratios, their range, and a 90 % bootstrap interval of the median
    (what the rounds can resolve: on a drifting VM, a ±5 % claim needs that interval inside 0.95–1.05)."""
    boot = np.median(np.random.default_rng(0).choice(ratios, (4000, len(ratios))), axis=1)
    lo, hi = np.percentile(boot, [5, 95])
    return f"{statistics.median(ratios):.3f} ({min(ratios):.2f}–{max(ratios):.2f}; CI {lo:.2f}–{hi:.2f})"


def in_sweep_rounds(a, name: str, bench: dict, lines: list[str]) -> None:
    """Alternate: the job's sweep (its cells benchmarked in the job), then each cell alone; paired ratios."""
    from farm.run.jobs import submit_job

    ratios: dict[str, list[float]] = {}
    figures: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(a.in_sweep_rounds):
            rc = submit_job(str(a.in_sweep), a.address)
            if rc not in (0, 3):
                raise SystemExit(f"farm submit {a.in_sweep} failed (exit {rc})")
            cells, reference, _ = sweep_cells(name)
            for label, fmt, path, metrics in cells:
                quiet = farm_bench(fmt, path, reference, a.threads, bench, Path(d))["decode_tok_s"]
                ratios.setdefault(label, []).append(metrics["decode_tok_s"] / quiet)
                figures.setdefault(label, []).append((metrics["decode_tok_s"], quiet))
                print(f"{label}: in the job {metrics['decode_tok_s']:.1f}, alone right after {quiet:.1f} tok/s "
                      f"(foreign CPUs in the job {metrics.get('foreign_cpus', float('nan')):.2f})", flush=True)
    start = len(lines)
    lines += ["", f"## In-sweep vs alone, paired in time ({a.in_sweep_rounds} rounds)", "",
              f"Each round submits `{a.in_sweep}` (its benchmarks re-run inside the Ray job: `bench.reuse: never`), then "
              "benchmarks each cell alone with farm's bench right after; the cluster stays up (idle) for both.", "",
              "| cell | decode in the job, per round | alone right after | in-job/alone, median of rounds (range; 90 % CI) |",
              "|---|---|---|---|"]
    for label, rs in sorted(ratios.items()):
        lines.append(f"| {label} | {', '.join(f'{x:.1f}' for x, _ in figures[label])} | "
                     f"{', '.join(f'{y:.1f}' for _, y in figures[label])} | {paired(rs)} |")
    print("\n".join(lines[start:]), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cells", nargs="*", help="FORMAT=PATH (gguf, onnx, openvino), with --reference")
    p.add_argument("--sweep", help="take the cells and bench settings from this sweep's latest run")
    p.add_argument("--reference", type=Path, help="a sweep's reference stage directory (the prompt's text)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=6, help="farm / bare pairs per cell (median of the pairs' ratios)")
    p.add_argument("--bench-repeats", type=int, help="repeats per process (default: the sweep's bench.repeats)")
    p.add_argument("--out", type=Path, help=f"default {OUT} (with --in-sweep: agreement-insweep.md beside it)")
    p.add_argument("--in-sweep", type=Path, metavar="JOB", help="the paired in-sweep check with this sweep file")
    p.add_argument("--in-sweep-rounds", type=int, default=3)
    p.add_argument("--address", default=os.environ.get("RAY_DASHBOARD", "http://127.0.0.1:8265"))
    p.add_argument("--bare", nargs=2, metavar=("FORMAT", "PATH"), help=argparse.SUPPRESS)
    for k in ("prompt", "decode", "warmup", "repeats"):
        p.add_argument(f"--{k}", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.bare:
        a.fmt, a.path = a.bare
        a.decode, a.warmup, a.repeats = int(a.decode), int(a.warmup), int(a.repeats)
        return bare_child(a)
    from farm import nodes
    from farm.measure.speed import prompt_tokens

    if a.in_sweep:  # the bench settings and name are the job's: its experiment may not exist yet
        from farm.sweep import spec

        job = spec.load(str(a.in_sweep))
        cells, reference, bench = [], None, job.bench.model_dump()
    elif a.sweep:
        cells, reference, bench = sweep_cells(a.sweep)
    else:
        reference, bench = a.reference, {"prompt_tokens": 128, "decode_tokens": 64, "warmup": 1, "repeats": 3}
        cells = [(f"{f}:{Path(x).name}", f, x, {}) for f, _, x in (c.partition("=") for c in a.cells)]
    if a.bench_repeats:
        bench = {**bench, "repeats": a.bench_repeats}
    facts = nodes.facts()
    if a.in_sweep:
        lines = [f"# In-sweep vs alone ({time.strftime('%Y-%m-%d', time.gmtime())})", "",
                 f"CPU: {facts['model_name']} ({facts['family']}, {facts['isa']}), {a.threads} threads. Command: "
                 f"`{' '.join(['.venv/bin/python', 'benchmarks/agreement.py'] + sys.argv[1:])}`"]
        in_sweep_rounds(a, job.name, bench, lines)
        a.out = a.out or OUT.with_name("agreement-insweep.md")
        a.out.write_text("\n".join(lines) + "\n")
        return
    lines = [f"# Agreement: farm's bench vs bare runtime loops ({time.strftime('%Y-%m-%d', time.gmtime())})", "",
             f"CPU: {facts['model_name']} ({facts['family']}, {facts['isa']}), {a.threads} threads; prompt "
             f"{bench['prompt_tokens']} tokens, decode {bench['decode_tokens']}, {bench['warmup']} warm-up + "
             f"{bench['repeats']} repeats per process, {a.rounds} rounds, each a farm/bare pair in alternating order "
             "(medians of each side; farm/bare is the median of the pairs' ratios). Command: "
             f"`{' '.join(['.venv/bin/python', 'benchmarks/agreement.py'] + sys.argv[1:])}`", "",
             "| cell | farm decode | bare decode | farm/bare, median of rounds (range; 90 % CI) | farm prefill | "
             "bare prefill | farm/bare (range; CI) | in-sweep decode | in-sweep/quiet (quiet rounds' range) | "
             "roofline eff. |", "|" + "---|" * 10]
    a.out = a.out or OUT
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        prompt = work / "prompt.json"
        prompt.write_text(json.dumps(prompt_tokens(reference, bench["prompt_tokens"])))
        rounds = {}
        for label, fmt, path, sweep_metrics in cells:
            farm, raw = [], []
            for i in range(a.rounds):  # who goes first alternates: a drift within a round favours neither
                order = [(farm, lambda: farm_bench(fmt, path, reference, a.threads, bench, work)),
                         (raw, lambda: bare(fmt, path, prompt, a.threads, bench, work))]
                for into, run in order[::-1] if i % 2 else order:
                    into.append(run())
            fd, bd = (statistics.median(x["decode_tok_s"] for x in xs) for xs in (farm, raw))
            fp, bp = (statistics.median(x["prefill_tok_s"] for x in xs) for xs in (farm, raw))
            ratio = {k: [x[f"{k}_tok_s"] / y[f"{k}_tok_s"] for x, y in zip(farm, raw)]
                     for k in ("decode", "prefill")}  # each round's pair: a drift between rounds cancels
            roof = statistics.median(x.get("roofline", {}).get("roofline_efficiency", float("nan")) for x in farm)
            sd = sweep_metrics.get("decode_tok_s")
            quiet = [x["decode_tok_s"] for x in farm]  # the in-sweep figure beside the quiet rounds' own spread
            row = (f"| {label} | {fd:.1f} | {bd:.1f} | {paired(ratio['decode'])} | {fp:.0f} | {bp:.0f} | "
                   f"{paired(ratio['prefill'])} | "
                   + (f"{sd:.1f} | {sd / fd:.3f} ({min(quiet) / fd:.2f}–{max(quiet) / fd:.2f})" if sd else "- | -")
                   + f" | {roof:.0%} |")
            lines.append(row)
            print(row, flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text("\n".join(lines) + "\n")  # partial results survive an interrupted run
            rounds[label] = {"farm": [{k: x[k] for k in ("decode_tok_s", "prefill_tok_s")} for x in farm],
                             "bare": raw}
            a.out.with_suffix(".json").write_text(json.dumps(rounds, indent=1))  # every round, for a later look


if __name__ == "__main__":
    main()
