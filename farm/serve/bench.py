"""The serve benchmark of one cell: its artifact behind its engine on 127.0.0.1, a bounded load at each
concurrency level — once with distinct prompts, once with prompts that share a prefix — and the engine's own
counters read before and after every level.

Each level gets prompts from a part of the corpus no earlier level used, so nothing is served from a cache
by accident: what the shared-prefix pass saves is the engine's prefix reuse, visible in its counters
(cached prompt tokens) and in time to first token. The engine runs with `threads` threads and one slot
per request of the highest level; the load client (asyncio, a few ms of CPU per request) shares the node.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np

from farm.serve import engine
from farm.serve.loadgen import prompts_from_ids, run_level

# The figures of one level, and the direction in which each gets better (serve_output_tok_s_c4, ...)
SERVE_KEYS = {"output_tok_s": "max", "requests_s": "max", "ttft_p50_ms": "min", "ttft_p90_ms": "min",
              "itl_p50_ms": "min", "itl_p90_ms": "min", "e2e_p50_ms": "min", "e2e_p90_ms": "min"}
SERVE_METRIC = rf"^serve_(prefix_)?({'|'.join(SERVE_KEYS)})_c([1-9][0-9]*)$"
POLL_S = 0.1
MODEL_ALIAS = "farm-cell"


def serve_requests(serve: dict, concurrency: int) -> int:
    return serve["requests"] or max(4, 2 * concurrency)


def serve_corpus_tokens(serve: dict) -> int:
    """Corpus tokens a serve benchmark consumes: a warm-up prompt per slot, then distinct prompts for every level
    of both passes (the shared-prefix pass: a fresh prefix per level, then each prompt's own tokens)."""
    p, s, levels = serve["prompt_tokens"], serve["shared_prefix_tokens"], serve["concurrency"]
    n = sum(serve_requests(serve, c) for c in levels)
    return max(levels) * p + n * p + ((len(levels) * s + n * (p - s)) if s else 0)


def _delta(before: dict, after: dict) -> dict:
    d = {k: (after[k] - before[k]) if before[k] is not None else None for k in before if k != "running"}
    steps = d.get("decode_steps") or 0
    return {"prompt_tokens": d.get("prompt_tokens"), "cached_prompt_tokens": d.get("cached_prompt_tokens"),
            "decode_steps": steps, "seqs_per_decode": (d["busy_slot_steps"] / steps) if steps else float("nan")}


def _watcher(eng, url: str):
    """Polls the engine while a level runs: the most requests it ever held in flight at once."""
    async def watch():
        peak = 0.0
        try:
            while True:
                try:
                    peak = max(peak, (await eng.counters(url)).get("running", 0.0))
                except OSError:
                    pass
                await asyncio.sleep(POLL_S)
        except asyncio.CancelledError:
            return {"peak_running": peak}
    return watch


def run(runtime: dict, artifact: Path, tokenizer_dir: Path, corpus: np.ndarray, spec: dict, threads: int,
        workdir: Path) -> dict:
    """Returns {"levels": {"distinct": [...], "shared_prefix": [...]}, "settings", "engine", ...}."""
    from transformers import AutoTokenizer

    eng = engine(runtime["name"])
    options = {k: v for k, v in runtime.items() if k != "name"}
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def decode(ids):
        return tok.decode([int(i) for i in ids], skip_special_tokens=True)

    need = serve_corpus_tokens(spec)
    if need > len(corpus):
        raise ValueError(f"serve: the benchmark needs {need} corpus tokens (prompts never repeat), the data has "
                         f"{len(corpus)}; lower serve.requests, serve.prompt_tokens or the concurrency levels, "
                         "or raise data.calib_tokens")
    parallel = max(spec["concurrency"])
    n_ctx = parallel * (spec["prompt_tokens"] + spec["output_tokens"] + 16)
    p, out_tokens, timeout = spec["prompt_tokens"], spec["output_tokens"], spec["timeout_s"]
    passes = [("distinct", 0)] + ([("shared_prefix", spec["shared_prefix_tokens"])]
                                  if spec["shared_prefix_tokens"] else [])
    levels: dict[str, list[dict]] = {name: [] for name, _ in passes}
    t0 = time.time()
    srv = eng.server(Path(artifact), workdir, threads, parallel, n_ctx, alias=MODEL_ALIAS, **options)
    with srv:
        startup_s = time.time() - t0
        offset = 0
        # one request per slot at once: the first use of every slot and batch size pays its one-time costs here
        warm = prompts_from_ids(corpus, decode, parallel, p, 0, offset)
        offset += parallel * p
        _guarded(srv, "warming up", lambda: run_level(srv.url, MODEL_ALIAS, warm, parallel, out_tokens, timeout))
        for name, shared in passes:
            for c in spec["concurrency"]:
                n = serve_requests(spec, c)
                prompts = prompts_from_ids(corpus[offset:], decode, n, p, shared)
                offset += shared + n * (p - shared)
                before = asyncio.run(eng.counters(srv.url))
                level = _guarded(srv, f"serving {n} requests at concurrency {c}",
                                 lambda: run_level(srv.url, MODEL_ALIAS, prompts, c, out_tokens, timeout,
                                                   watch=_watcher(eng, srv.url)))
                level.update({f"engine_{k}": v for k, v in
                              _delta(before, asyncio.run(eng.counters(srv.url))).items()})
                level["shared_prefix_tokens"] = shared
                levels[name].append(level)
        settings = eng.settings(srv)
    for link in workdir.glob("*"):  # links to engine libraries (llama.cpp's CPU backends) are not results
        if link.is_symlink():
            link.unlink()
    return {"levels": levels, "settings": settings, "engine": eng.TITLE, "startup_s": startup_s,
            "parallel": parallel, "n_ctx": n_ctx, "threads": threads, "seconds": time.time() - t0}


def _guarded(srv, doing: str, fn):
    """A level whose requests fail because the engine died is reported as the engine's death."""
    try:
        return fn()
    except Exception:
        srv.check_alive(doing)  # raises EngineDied naming the signal
        raise


METRICS = tuple(SERVE_KEYS)


def mlflow_metrics(result: dict, scalars: set[str] = frozenset()) -> list[tuple[str, float, int]]:
    """(name, value, step=concurrency): MLflow draws each as a curve over concurrency; and, for the names in
    `scalars` (those the sweep's objectives and constraints name), the figure at one level as a metric of its own
    (serve_output_tok_s_c4, step 0) — only those, or a run would show dozens of one-point charts."""
    out = []
    for name, levels in result["levels"].items():
        prefix = "serve_" if name == "distinct" else "serve_prefix_"
        for lv in levels:
            for k in METRICS + ("engine_seqs_per_decode",):
                out.append((prefix + k.replace("engine_", ""), float(lv[k]), int(lv["concurrency"])))
            out += [(f"{prefix}{k}_c{lv['concurrency']}", float(lv[k]), 0) for k in METRICS
                    if f"{prefix}{k}_c{lv['concurrency']}" in scalars]
            if lv.get("engine_cached_prompt_tokens") is not None and lv.get("engine_prompt_tokens") is not None:
                total = lv["engine_cached_prompt_tokens"] + lv["engine_prompt_tokens"]
                out.append((prefix + "cached_prompt_frac", lv["engine_cached_prompt_tokens"] / total if total else 0.0,
                            int(lv["concurrency"])))
    return out


def table(result: dict) -> str:
    rows = ["pass           conc  req   tok/s   req/s  TTFT p50/p90 ms   ITL p50/p90 ms   E2E p50 ms  seqs/step  cached"]
    for name, levels in result["levels"].items():
        for lv in levels:
            hit, miss = lv.get("engine_cached_prompt_tokens"), lv.get("engine_prompt_tokens")
            cached = f"{hit / (hit + miss):.0%}" if hit is not None and miss is not None and hit + miss else "-"
            rows.append(f"{name:<14} {lv['concurrency']:>4} {lv['requests']:>4} {lv['output_tok_s']:>7.1f} "
                        f"{lv['requests_s']:>7.2f} {lv['ttft_p50_ms']:>7.0f}/{lv['ttft_p90_ms']:<7.0f}  "
                        f"{lv['itl_p50_ms']:>6.1f}/{lv['itl_p90_ms']:<6.1f}   {lv['e2e_p50_ms']:>9.0f}  "
                        f"{lv.get('engine_seqs_per_decode', float('nan')):>9.2f}  {cached:>6}")
    return "\n".join(rows)


def plot(curves: dict[str, dict], path: Path) -> None:
    """Latency vs throughput: one line per cell (and pass), a point per concurrency level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, result in curves.items():
        for name, levels in result["levels"].items():
            xs = [lv["output_tok_s"] for lv in levels]
            style = "-o" if name == "distinct" else "--s"
            for ax, key in zip(axes, ("itl_p50_ms", "ttft_p50_ms")):
                line, = ax.plot(xs, [lv[key] for lv in levels], style,
                                label=f"{label}{'' if name == 'distinct' else ' (shared prefix)'}")
                for lv, x in zip(levels, xs):
                    ax.annotate(str(lv["concurrency"]), (x, lv[key]), textcoords="offset points", xytext=(4, 4),
                                fontsize=7, color=line.get_color())
    for ax, what in zip(axes, ("inter-token latency p50 (ms)", "time to first token p50 (ms)")):
        ax.set_xlabel("aggregate output tokens/s")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("serving: latency vs throughput (numbers = concurrent streams)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=1, default=float))
