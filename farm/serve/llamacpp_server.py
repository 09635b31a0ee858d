"""GGUF behind llama.cpp's own `llama-server`: continuous batching over `--parallel` slots, a prompt cache,
Prometheus `/metrics`, and the OpenAI API (/v1/completions, /v1/chat/completions with the GGUF's chat template,
streaming, /v1/models, /health).

The binary is built by scripts/build-llama-server.sh from the llama.cpp inside the pinned llama-cpp-python
sdist, with the same GGML_CPU_ALL_VARIANTS flags and AMX fix: the code that served is the code that measured.
Its CPU backends sit in variants/; the server is started in a directory that holds links to the variants it
may use — all but the AMX one unless `amx: true`, as farm/runtimes/ggml_cpu.py does in-process — and ggml
loads the best-scoring of those itself. Which one it loaded is read back from the process's memory map.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from farm.errors import StageError
from farm.runtimes.ggml_cpu import AMX_VARIANTS
from farm.serve.common import Server, free_port, get_text, prometheus

TITLE = "llama.cpp llama-server"
RUNTIME = "llamacpp"
ADAPTERS = True  # LoRA adapters unmerged (--lora), each request choosing its own
TIMEOUT_S = 10  # llama-server's socket read/write timeout (its default, an hour, lets idle connections lock it up)


def binary() -> Path:
    """$FARM_LLAMA_SERVER, else the llama-server linked beside the virtualenv by `make setup`."""
    path = Path(os.environ.get("FARM_LLAMA_SERVER") or Path(sys.prefix) / "llama-server")
    if not path.exists():
        raise StageError(f"llama-server not found at {path}: `make setup` builds it (scripts/build-llama-server.sh "
                         ".venv/bin/pip), or point FARM_LLAMA_SERVER at a llama-server binary")
    return path.resolve()


def variant_links(workdir: Path, amx: bool) -> list[str]:
    """Link the CPU backends this server may load into workdir (its working directory); returns their names."""
    variants = binary().parent / "variants"
    force = os.environ.get("FARM_GGML_CPU_VARIANT")
    names = []
    for lib in sorted(variants.glob("libggml-cpu-*.so")):
        name = lib.name[len("libggml-cpu-"):-len(".so")]
        if (force and name != force) or (not force and not amx and name in AMX_VARIANTS):
            continue
        link = workdir / lib.name
        if not link.exists():
            link.symlink_to(lib)
        names.append(name)
    if not names:
        raise StageError(f"no llama.cpp CPU backend to serve with in {variants}"
                         + (f" (FARM_GGML_CPU_VARIANT={force})" if force else ""))
    return names


def server(gguf: Path, workdir: Path, threads: int, parallel: int, n_ctx: int, amx: bool = False,
           repack: bool = True, host: str = "127.0.0.1", port: int | None = None, alias: str | None = None,
           ready_timeout: float | None = None, lora: list[Path] = (), lora_applied: bool = True,
           api_key: str | None = None) -> Server:
    """A llama-server for `gguf` with `parallel` slots sharing one KV cache of n_ctx tokens (unified: the cells
    one slot leaves, another may use), each request at most n_ctx / parallel tokens (prompt and output: a longer
    prompt is refused with 400, an output stops there), `threads` threads for decode and prompt batches.
    Without the per-slot bound a slot may grow to the model's training context, and requests that together
    outgrow the cache all fail (HTTP 500). Connections idle for TIMEOUT_S let go of their HTTP thread; there is
    no /slots (every user's prompt). `api_key`: wanted on every route but /health and /v1/models (passed in
    the environment, never on a command line). `lora`: GGUF adapters loaded beside the model (ids 0, 1, ... in
    this order); a request picks its own with the body field "lora": [{"id": 0, "scale": 1.0}], else every
    adapter applies at scale 1 (`lora_applied`) or none."""
    workdir.mkdir(parents=True, exist_ok=True)
    variant_links(workdir, amx)
    gguf, lora = Path(gguf).resolve(), [Path(p).resolve() for p in lora]  # the server runs in workdir (str or Path)
    port = port or free_port(host)
    cmd = [str(binary()), "-m", str(gguf), "--host", host, "--port", str(port), "-t", str(threads),
           "-tb", str(threads), "--parallel", str(parallel), "-c", str(n_ctx), "--kv-unified",
           "--kv-unified-per-slot", str(n_ctx // parallel), "--timeout", str(TIMEOUT_S), "--metrics", "--no-slots",
           "--no-webui", "--jinja", "-a", alias or gguf.stem]
    if not repack:
        cmd.append("--no-repack")
    if lora:  # off by default: scale 0, which llama.cpp leaves out of the graph (a request without "lora" uses these)
        if any("," in str(p) or ":" in str(p) for p in lora):
            raise StageError(f"llama-server reads adapters as FNAME:SCALE,...: rename {', '.join(map(str, lora))} "
                             "without ',' or ':'")
        cmd += ["--lora-scaled", ",".join(f"{p}:{1.0 if lora_applied else 0.0}" for p in lora)]
    cmd += os.environ.get("FARM_LLAMA_SERVER_ARGS", "").split()  # more llama-server flags, for experiments
    kw = {"ready_timeout": ready_timeout} if ready_timeout else {}
    return Server(cmd, TITLE, workdir / "llama-server.log", host, port, cwd=workdir, api_key=api_key,
                  env={"LLAMA_API_KEY": api_key} if api_key else None, **kw)


def settings(srv: Server) -> dict[str, str]:
    """What ran: the CPU backend ggml loaded, read from the running server's memory map (a release build logs
    nothing about it)."""
    try:
        maps = Path(f"/proc/{srv.proc.pid}/maps").read_text()
    except OSError:
        maps = ""
    found = sorted(set(re.findall(r"libggml-cpu-([\w-]+)\.so", maps)))
    return {"cpu_variant": ",".join(found) or "unknown"}


async def counters(url: str) -> dict[str, float]:
    """The engine's own counters (/metrics), in farm's names: prompt tokens computed, prompt tokens taken from
    the prompt cache, decode steps, sequences summed over decode steps, requests in flight now."""
    import asyncio

    m = prometheus(await asyncio.to_thread(get_text, f"{url}/metrics"))
    steps = m["llamacpp:n_decode_total"]
    return {"prompt_tokens": m["llamacpp:prompt_tokens_total"],
            "cached_prompt_tokens": m["llamacpp:prompt_tokens_cached_total"],
            "decode_steps": steps, "busy_slot_steps": m["llamacpp:n_busy_slots_per_decode"] * steps,
            "running": m["llamacpp:requests_processing"]}
