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

import numpy as np

from farm import storage

MIB = 1 << 20
GATHERS = {"Gather", "GatherBlockQuantized"}  # ops that read one row of a table per token
ARRAY_MB = 256
PASSES = ("Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Cast",
          "DequantizeLinear", "Mul", "Sub", "Identity")  # decompression ops between a stored weight and its user


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


# --- bytes a decode step reads, per format ---------------------------------------------------------------

def _gguf(path: Path) -> tuple[int, dict]:
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


def _terminal(start, consumers, op_type) -> set[str]:
    """The op types that finally use a stored weight, looking through decompression ops."""
    seen, todo, out = set(), [start], set()
    while todo:
        node = todo.pop()
        for user in consumers(node):
            t = op_type(user)
            if t in PASSES and id(user) not in seen:
                seen.add(id(user))
                todo.append(user)
            elif t not in PASSES:
                out.add(t)
    return out


def _onnx(path: Path) -> tuple[int, dict]:
    import onnx
    from onnx import helper

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    by_input: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            by_input.setdefault(name, []).append(node)
    total = 0
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if "length" in ext:
            size = int(ext["length"])
        elif init.raw_data:
            size = len(init.raw_data)
        else:
            size = int(np.prod(init.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        users = _terminal(init.name, lambda n: [u for o in ([n] if isinstance(n, str) else n.output)
                                                for u in by_input.get(o, [])], lambda n: n.op_type)
        if users and users <= GATHERS:
            continue  # the embedding table: one row per token
        total += size
    past = [i for i in model.graph.input if i.name.startswith("past_key_values")]
    shape = {**_hf_shape(path), "kv_bytes": 4}
    if past:
        elem = past[0].type.tensor_type.elem_type
        shape["kv_bytes"] = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize
    return total, shape


def _openvino(path: Path, kv_precision: str | None) -> tuple[int, dict]:
    import openvino as ov

    model = ov.Core().read_model(str(path / "openvino_model.xml"))
    total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        users = _terminal(op, lambda n: [t.get_node() for o in n.outputs() for t in o.get_target_inputs()],
                          lambda n: n.get_type_name())
        if users and users <= GATHERS:
            continue
        total += int(op.get_byte_size())
    shape = _hf_shape(path)
    shape["kv_bytes"] = {"u8": 1, "i8": 1, "f16": 2, "bf16": 2, "f32": 4}.get((kv_precision or "f16").lower(), 2)
    return total, shape


def _torch(path: Path) -> tuple[int, dict]:
    from safetensors import safe_open

    total, shape = 0, _hf_shape(path)
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for name in st.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if "embed_tokens" in name and not shape.get("tied"):
                    continue
                sl = st.get_slice(name)
                total += int(np.prod(sl.get_shape())) * {"F32": 4, "F16": 2, "BF16": 2}.get(sl.get_dtype(), 4)
    shape["kv_bytes"] = 4
    return total, shape


def _hf_shape(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    heads = cfg.get("num_attention_heads")
    return {"layers": cfg.get("num_hidden_layers"), "kv_heads": cfg.get("num_key_value_heads") or heads,
            "head_dim": cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else None),
            "tied": bool(cfg.get("tie_word_embeddings"))}


def bytes_per_token(fmt: str, artifact: Path, context: float, settings: dict) -> dict | None:
    """Weights + KV cache a decode step reads at `context` tokens; None for a format it cannot read."""
    readers = {"gguf": _gguf, "onnx": _onnx, "torch": _torch,
               "openvino": lambda p: _openvino(p, settings.get("KV_CACHE_PRECISION"))}
    if fmt not in readers:
        return None
    weights, shape = readers[fmt](Path(artifact))
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
