"""Process-isolated speed and memory: each benchmark runs in a fresh Python process.

In the child: load the artifact through its runtime, warm up, then `repeats` times: prefill a prompt
of `prompt_tokens` tokens (fresh context) and decode `decode_tokens` tokens greedily, one step at a
time. Reported: prefill and decode tokens/s (medians over repeats) with their coefficient of
variation, time to first token, per-token latency p50/p90 over every decode step, the child's peak
RSS, and the artifact's size on disk.

The child watches the machine during its timed window: CPU time spent by *other* processes is
recorded as `foreign_cpus` (average busy CPUs, farm/measure/cpuload.py), and a run above CONTAMINATED_CPUS
is flagged rather than silently reported as clean.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from farm.measure.cpuload import CONTAMINATED_CPUS, foreign_since, mark

PINNING = ("compact", "spread", "none")


STATUS = "/proc/self/status"


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: that survives exec() and would report
    the RSS of the (large) Ray worker this process was forked from."""
    for line in Path(STATUS).read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{STATUS} has no VmHWM line: this process's own peak memory cannot be read here "
                       "(ru_maxrss would report the Ray worker it was forked from)")


def one_repeat(rt, prompt: list[int], decode: int) -> dict:
    """Prefill (fresh context) then `decode` greedy steps; the machine's other load alongside."""
    busy0, own0, wall0 = mark()
    t0 = time.perf_counter()
    tok = int(np.argmax(rt.prefill(prompt)))
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(decode):
        s = time.perf_counter()
        tok = int(np.argmax(rt.step(tok)))
        steps.append(time.perf_counter() - s)
    foreign = foreign_since(busy0, own0, wall0)
    return {"prefill_s": prefill, "decode_s": sum(steps), "step_s": steps, "foreign_cpus": foreign}


def measure(runtime: str | dict, artifact: Path, prompt: list[int], decode: int, warmup: int, repeats: int,
            threads: int) -> dict:
    """A repeat during which other processes used more than CONTAMINATED_CPUS is set aside and run
    again (up to 3x `repeats` tries); if clean repeats still fall short, the result is flagged."""
    from farm.runtimes import load

    t0 = time.perf_counter()
    rt = load(runtime, artifact, threads=threads, n_ctx=len(prompt) + decode + 8)
    load_s = time.perf_counter() - t0
    for _ in range(warmup):
        one_repeat(rt, prompt, decode)
    clean, dirty = [], []
    while len(clean) < repeats and len(clean) + len(dirty) < 3 * repeats:
        rep = one_repeat(rt, prompt, decode)
        (clean if rep["foreign_cpus"] <= CONTAMINATED_CPUS else dirty).append(rep)
    dirty.sort(key=lambda r: r["foreign_cpus"])
    used = clean + dirty[: repeats - len(clean)]
    prefill_tps = [len(prompt) / r["prefill_s"] for r in used]
    decode_tps = [decode / r["decode_s"] for r in used]
    steps = [s for r in used for s in r["step_s"]]
    return {
        "prefill_tok_s": float(np.median(prefill_tps)),
        "decode_tok_s": float(np.median(decode_tps)),
        "ttft_ms": float(np.median([r["prefill_s"] for r in used]) * 1e3),  # prefill + first token's argmax
        "token_latency_p50_ms": float(np.percentile(steps, 50) * 1e3),
        "token_latency_p90_ms": float(np.percentile(steps, 90) * 1e3),
        "peak_rss_mb": peak_rss_mb(),
        "prefill_tok_s_cv": float(np.std(prefill_tps) / np.mean(prefill_tps)),
        "decode_tok_s_cv": float(np.std(decode_tps) / np.mean(decode_tps)),
        "load_s": load_s,
        "foreign_cpus": float(np.mean([r["foreign_cpus"] for r in used])),
        "repeats_set_aside": len(clean) + len(dirty) - len(used),
        "contaminated": len(clean) < repeats,
        "threads": threads,
        "runtime_settings": getattr(rt, "settings", {}),
        "raw": {"used": used, "set_aside": [r for r in dirty if r not in used]},
    }


def run(runtime: dict, artifact: Path, reference: Path, bench: dict, threads: int, out_json: Path,
        what: str = "") -> dict:
    """Run one benchmark in a fresh process; return its metrics (raw JSON written to out_json). A crash
    of the runtime raises farm.measure.isolate.RuntimeCrash naming the signal and the native frame."""
    from farm.measure.isolate import run_child, timeout_for
    from farm.runtimes import RUNTIMES

    args = ["-m", "farm.measure.speed", "--runtime", json.dumps(runtime), "--artifact", str(artifact),
            "--reference", str(reference), "--threads", str(threads), "--prompt-tokens",
            str(bench["prompt_tokens"]), "--decode-tokens", str(bench["decode_tokens"]),
            "--warmup", str(bench["warmup"]), "--repeats", str(bench["repeats"]), "--out", str(out_json),
            "--pinning", bench.get("pinning", "compact")]
    # a disturbed repeat is run again, up to 3x repeats runs in all
    runs = bench["warmup"] + 3 * bench["repeats"]
    run_child(args, RUNTIMES.options(runtime["name"]).TITLE, f"benchmarking {what or runtime['name']}",
              timeout_for(artifact, runs * bench["decode_tokens"], runs * bench["prompt_tokens"]))
    return json.loads(out_json.read_text())


def _topology(cpu: int) -> tuple[int, int]:
    base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return int((base / "physical_package_id").read_text()), int((base / "core_id").read_text())
    except (OSError, ValueError):
        return 0, cpu


def choose_cores(threads: int, policy: str, allowed: list[int]) -> list[int] | None:
    """The cores a benchmark of `threads` threads runs on, from those the node may use. compact: the first
    `threads` in numbering order (neighbours, sharing caches); spread: one per physical core, round-robin
    over sockets, before any second hardware thread of a core; none: no pinning (None)."""
    allowed = sorted(allowed)
    if policy == "none":
        return None
    if threads >= len(allowed):
        return allowed
    if policy == "compact":
        return allowed[:threads]
    by_package: dict[int, list[tuple[int, int]]] = {}
    seen_cores = set()
    firsts, seconds = [], []
    for cpu in allowed:
        package, core = _topology(cpu)
        (seconds if (package, core) in seen_cores else firsts).append((package, cpu))
        seen_cores.add((package, core))
    for package, cpu in firsts:
        by_package.setdefault(package, []).append(cpu)
    order = []
    while any(by_package.values()):
        for package in sorted(by_package):
            if by_package[package]:
                order.append(by_package[package].pop(0))
    order += [cpu for _, cpu in seconds]
    return sorted(order[:threads])


def pin(threads: int, policy: str = "compact") -> list[int]:
    """Pin this process (and so every runtime thread it starts) to cores chosen by `policy` among those it
    may use: the node's cores, as its raylet was started with them (clusters/local pins nodes with taskset).
    Returns the cores it may run on."""
    allowed = sorted(os.sched_getaffinity(0))
    cores = choose_cores(threads, policy, allowed)
    if cores is None:
        return allowed
    os.sched_setaffinity(0, cores)
    return cores


def prompt_tokens(reference: Path, n: int) -> list[int]:
    """n tokens: the tokenizer's sequence prefix (a BOS, for models that have one), then corpus text."""
    from farm.measure.quality import corpus_tokens

    prefix, ids = corpus_tokens(reference)
    if len(prefix) + len(ids) < n:
        raise ValueError(f"bench.prompt_tokens={n} exceeds the {len(prefix) + len(ids)} tokens of text available")
    return prefix + ids[:n - len(prefix)].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description="One isolated benchmark (used by farm's bench stage).")
    p.add_argument("--runtime", required=True, help='a runtime name or JSON {"name": ..., <its options>}')
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--prompt-tokens", type=int, required=True)
    p.add_argument("--decode-tokens", type=int, required=True)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pinning", choices=PINNING, default="compact")
    a = p.parse_args()
    cores = pin(a.threads, a.pinning)
    prompt = prompt_tokens(a.reference, a.prompt_tokens)
    runtime = json.loads(a.runtime) if a.runtime.startswith("{") else a.runtime
    started = time.time()
    result = measure(runtime, a.artifact, prompt, a.decode_tokens, a.warmup, a.repeats, a.threads)
    result.update({"cores": cores, "pinning": a.pinning, "measured_at": started})
    a.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
