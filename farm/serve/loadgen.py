"""A bounded load against an OpenAI-compatible endpoint: `concurrency` closed-loop clients send `requests`
streaming /v1/completions between them, each for exactly `output_tokens` tokens (ignore_eos), and every
token's arrival is timed on the client.

Per level: aggregate output tok/s and requests/s (over the level's wall time), time to first token,
inter-token latency (gaps between streamed tokens) and end-to-end latency, p50/p90; the prompt tokens
the server says it processed (usage) and, where the engine says so (llama-server's `timings.cache_n`),
how many prompt tokens it took from its cache instead of computing them.

Why our own client: guidellm 0.8.1 pins transformers 5.24 / huggingface-hub 2.4 (it cannot share the farm's
environment) and aiperf 0.13.0 wants its own too; this one is ~150 lines on aiohttp, and its figures are
checked against the engine's own counters (tests/test_serve.py: llama-server's /metrics tokens and its
per-request timings).
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np

LEVEL_TIMEOUT_S = 600  # one level never runs longer than this, whatever the engine does


async def one_request(session, url: str, body: dict, timeout: float) -> dict:
    """Send one streaming completion; the times of its first and every later token chunk."""
    import aiohttp

    t0 = time.perf_counter()
    times, usage, cached, text = [], None, None, []
    async with session.post(f"{url}/v1/completions", json=body,
                            timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}/v1/completions answered HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            now = time.perf_counter()
            piece = (chunk.get("choices") or [{}])[0].get("text")
            if piece:  # a token's text; the closing chunk (finish_reason, no text) is not a token
                times.append(now)
                text.append(piece)
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("timings"):  # llama-server: prompt tokens served from its cache
                cached = chunk["timings"].get("cache_n", cached)
    end = time.perf_counter()
    if not times:
        raise RuntimeError(f"{url}/v1/completions streamed no tokens")
    n_out = int(usage["completion_tokens"]) if usage and usage.get("completion_tokens") else len(times)
    return {"start": t0, "ttft": times[0] - t0, "itl": list(np.diff(times)), "e2e": end - t0, "end": end,
            "output_tokens": n_out, "chunks": len(times),
            "prompt_tokens": int(usage["prompt_tokens"]) if usage and usage.get("prompt_tokens") else None,
            "cached_tokens": cached, "text": "".join(text)}


async def _level(url: str, model: str, prompts: list[str], concurrency: int, output_tokens: int,
                 timeout: float, watch=None, extra=None, api_key: str | None = None) -> dict:
    import aiohttp

    from farm.serve.common import auth

    queue = list(enumerate(prompts))
    results: list[dict] = []
    in_flight, peak = 0, 0

    async def client(session):
        nonlocal in_flight, peak
        while queue:
            i, prompt = queue.pop(0)
            body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "temperature": 0.0,
                    "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
                    **(extra(i) if extra else {})}
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                results.append({"index": i, **await one_request(session, url, body, timeout)})
            finally:
                in_flight -= 1

    # a fresh connection per request: llama-server closes a streamed response's connection, and reusing it fails
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=connector, headers=auth(api_key)) as session:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client(session)) for _ in range(concurrency)]
        watcher = asyncio.create_task(watch()) if watch else None
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        finally:
            for t in tasks:
                t.cancel()
            engine = await _stop(watcher)
        wall = time.perf_counter() - t0
    return summarize(results, wall, concurrency, peak, engine)


async def _stop(watcher):
    if watcher is None:
        return {}
    watcher.cancel()
    try:
        return await watcher
    except asyncio.CancelledError:
        return {}


def summarize(results: list[dict], wall: float, concurrency: int, client_peak: int, engine: dict) -> dict:
    def pct(xs, q):
        return float(np.percentile(xs, q) * 1e3) if len(xs) else float("nan")

    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["itl"]]
    e2e = [r["e2e"] for r in results]
    out_tokens = sum(r["output_tokens"] for r in results)
    prompt = [r["prompt_tokens"] for r in results if r["prompt_tokens"] is not None]
    cached = [r["cached_tokens"] for r in results if r["cached_tokens"] is not None]
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "output_tok_s": out_tokens / wall, "requests_s": len(results) / wall,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p90_ms": pct(ttft, 90),
            "itl_p50_ms": pct(itl, 50), "itl_p90_ms": pct(itl, 90),
            "e2e_p50_ms": pct(e2e, 50), "e2e_p90_ms": pct(e2e, 90),
            "output_tokens": out_tokens, "prompt_tokens_mean": float(np.mean(prompt)) if prompt else float("nan"),
            "cached_prompt_tokens": int(sum(cached)) if cached else None,
            "client_peak_in_flight": client_peak, **{f"engine_{k}": v for k, v in engine.items()}}


def run_level(url: str, model: str, prompts: list[str], concurrency: int, output_tokens: int,
              timeout: float = LEVEL_TIMEOUT_S, watch=None, extra=None, api_key: str | None = None) -> dict:
    """One level of load; `watch`: an async callable polled alongside (the engine's own counters), whose
    return value (a dict) joins the summary as engine_*; `extra(i)`: more body fields for prompt i (e.g. the
    LoRA adapter a user's request asks llama-server for); `api_key`: sent as `Authorization: Bearer KEY`."""
    return asyncio.run(_level(url.rstrip("/"), model, prompts, concurrency, output_tokens, timeout, watch, extra,
                              api_key))


def prompts_from_ids(ids: np.ndarray, decode, n: int, prompt_tokens: int, shared_prefix_tokens: int = 0,
                     offset: int = 0) -> list[str]:
    """n distinct prompts of `prompt_tokens` tokens of the corpus (decoded with the model's tokenizer);
    with a shared prefix, every prompt starts with the same `shared_prefix_tokens` tokens."""
    unique = prompt_tokens - shared_prefix_tokens
    need = shared_prefix_tokens + n * unique + offset
    if need > len(ids):
        raise ValueError(f"serve: {n} prompts of {prompt_tokens} tokens need {need} corpus tokens, the data has "
                         f"{len(ids)}; lower serve.requests or serve.prompt_tokens")
    prefix = list(ids[:shared_prefix_tokens])
    start = shared_prefix_tokens + offset
    return [decode(prefix + list(ids[start + i * unique:start + (i + 1) * unique])) for i in range(n)]
