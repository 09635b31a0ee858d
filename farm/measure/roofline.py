"""The memory roofline of decoding. One decode step reads every weight a token touches (every matmul and the
lm_head, not the embedding table, of which it reads one row) plus the KV cache so far; at batch 1 that is
what bounds tokens/s, so `bandwidth / bytes per token` is the speed the node's memory allows and
`roofline_efficiency` = measured decode tok/s over it says how much of it a runtime gets.

- bandwidth: a STREAM-like read (a sum over 256 MiB, far beyond any L3) and triad (a = b + s*c), with the
  threads and cores the benchmark used; measured once per node, cores and threads, and cached in
  $FARM_HOME/roofline/ (a measurement disturbed by other load is not cached).
- bytes per token: read from the artifact itself, per format (the weights' stored size, so int4 counts
  half a byte per weight plus its scales), plus the KV cache at the benchmark's mean decode context.
A model small enough to sit partly in the last-level cache can beat the roofline (efficiency > 1): the
result records the L3 size beside the bytes so that the report can say so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

from farm import storage

MIB = 1 << 20
ARRAY_MB = 256


def _stream(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    n = ARRAY_MB * MIB // 4
    a, b, c = torch.ones(n), torch.full((n,), 2.0), torch.empty(n)
    read, triad = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        float(a.sum())
        t1 = time.perf_counter()
        torch.add(a, b, alpha=3.0, out=c)
        t2 = time.perf_counter()
        read.append(n * 4 / (t1 - t0))
        triad.append(3 * n * 4 / (t2 - t1))
    return {"read_gbs": max(read) / 1e9, "triad_gbs": max(triad) / 1e9}


def l3_bytes() -> int:
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (idx / "level").read_text().strip() == "3":
                size = (idx / "size").read_text().strip()
                best = max(best, int(size.rstrip("K")) * 1024 if size.endswith("K") else int(size))
        except (OSError, ValueError):
            continue
    return best


def bandwidth(threads: int, cores: list[int], host: dict) -> dict:
    """Memory bandwidth (GB/s) on these cores with these threads: cached per node, else measured now."""
    from farm.measure import cpuload

    key = hashlib.sha256(json.dumps([host.get("hostname"), host.get("model_name"), cores, threads]).encode())
    path = storage.home() / "roofline" / f"{key.hexdigest()[:16]}.json"
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    busy0, own0, wall0 = cpuload.mark()
    result = {**_stream(threads), "threads": threads, "cores": cores, "measured_at": time.time(),
              "hostname": host.get("hostname"), "l3_bytes": l3_bytes()}
    result["foreign_cpus"] = foreign = cpuload.foreign_since(busy0, own0, wall0)
    if foreign <= cpuload.CONTAMINATED_CPUS:
        storage.atomic_write_text(path, json.dumps(result))
    return {**result, "cached": False}


def bytes_per_token(fmt: str, artifact: Path, context: float, settings: dict) -> dict | None:
    """Weights + KV cache a decode step reads at `context` tokens, as the format's own `decode_bytes` reads them
    from the artifact (farm/export/<format>_export.py); None for a format without one."""
    from farm.export import FORMATS

    reader = getattr(FORMATS.get(fmt), "decode_bytes", None) if fmt in FORMATS else None
    if reader is None:  # a format declares what a decode step reads beside its exporter (decode_bytes)
        return None
    weights, shape = reader(Path(artifact), settings)
    kv = 0
    if all(shape.get(k) for k in ("layers", "kv_heads", "head_dim")):
        kv = int(2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * shape["kv_bytes"] * context)
    return {"weight_bytes": weights, "kv_bytes": kv, "bytes_per_token": weights + kv}


def for_cell(fmt: str, artifact: Path, decode_tok_s: float, context: float, threads: int, cores: list[int],
             settings: dict, host: dict) -> dict:
    """The roofline numbers of one benchmark (an empty dict for a format without a byte reader)."""
    if os.environ.get("FARM_ROOFLINE", "1") == "0":
        return {}
    per = bytes_per_token(fmt, artifact, context, settings)
    if per is None:
        return {}
    bw = bandwidth(threads, cores, host)
    ceiling = bw["read_gbs"] * 1e9 / per["bytes_per_token"]
    return {"mem_bandwidth_gbs": bw["read_gbs"], "mem_triad_gbs": bw["triad_gbs"],
            "bytes_per_token_mb": per["bytes_per_token"] / 1e6, "weight_mb_per_token": per["weight_bytes"] / 1e6,
            "roofline_decode_tok_s": ceiling, "roofline_efficiency": decode_tok_s / ceiling,
            "l3_mb": bw.get("l3_bytes", 0) / MIB, "bandwidth": bw}


def main() -> None:
    """One cell's roofline in its own process (farm/stages/roofline.py), pinned to the benchmark's cores where this
    node has them (else chosen as the benchmark's pinning would)."""
    from farm import nodes
    from farm.measure.speed import PINNING, choose_cores

    p = argparse.ArgumentParser(description="The memory roofline of one benchmark (used by farm's roofline stage).")
    p.add_argument("--format", required=True)
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--decode-tok-s", type=float, required=True)
    p.add_argument("--context", type=float, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--cores", default="[]", help="the benchmark's cores (JSON list)")
    p.add_argument("--pinning", choices=PINNING, default="compact")
    p.add_argument("--settings", default="{}", help="the runtime's settings during the benchmark (JSON)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    allowed = sorted(os.sched_getaffinity(0))
    cores = json.loads(a.cores)
    if not cores or not set(cores) <= set(allowed):
        cores = choose_cores(a.threads, a.pinning, allowed) or allowed
    os.sched_setaffinity(0, cores)
    result = for_cell(a.format, a.artifact, a.decode_tok_s, a.context, a.threads, cores, json.loads(a.settings),
                      nodes.facts())
    a.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
