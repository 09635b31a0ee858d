"""OpenVINO IR behind openvino-genai's ContinuousBatchingPipeline, with a small OpenAI-compatible HTTP layer
(FastAPI + uvicorn): /v1/completions, /v1/chat/completions (the model's chat template), streaming,
/v1/models, /health, and Prometheus /metrics.

One task on the event loop owns the pipeline: it takes new requests, calls step() while any is unfinished —
the scheduler batches every running sequence into each step (continuous batching, paged KV cache, prefix
caching) — and hands each request's new tokens to its HTTP handler, which streams them before the next step. One LLMPipeline must not take concurrent requests
(openvino.genai #2480); this pipeline is made for them. Prompts go in as token ids of the model's own Hugging
Face tokenizer, so the IR needs no converted OpenVINO tokenizer.

    python -m farm.serve.openvino_server --model DIR --port 8000 --threads 2 --parallel 4 --n-ctx 1024
"""


import argparse
import asyncio
import itertools
import json
import sys
import time
import uuid
from pathlib import Path

from farm.serve.common import Server, free_port, get_text, prometheus

TITLE = "OpenVINO GenAI ContinuousBatchingPipeline"
RUNTIME = "openvino"
KV_BLOCK = 32  # tokens per KV-cache block (openvino-genai's CPU default)


class Engine:
    """The pipeline, stepped by one task on the server's event loop: a step runs every scheduled sequence one
    token further (or a chunk of a new prompt), then the loop writes what it produced to each stream before
    the next step. (A separate stepping thread would hold the GIL through step() and let tokens out in bursts.)"""

    def __init__(self, model_dir: Path, threads: int, parallel: int, n_ctx: int):
        import openvino_genai as ov_genai
        from transformers import AutoTokenizer

        self.g = ov_genai
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        sc = ov_genai.SchedulerConfig()
        sc.max_num_seqs = parallel
        sc.num_kv_blocks = (n_ctx + KV_BLOCK - 1) // KV_BLOCK + parallel  # room for every slot's full sequence
        sc.max_num_batched_tokens = max(256, n_ctx // max(parallel, 1))
        sc.dynamic_split_fuse = True
        sc.enable_prefix_caching = True
        self.pipe = ov_genai.ContinuousBatchingPipeline(
            str(model_dir), sc, "CPU", {"INFERENCE_NUM_THREADS": threads}, {})
        self.incoming: list[tuple] = []
        self.active: dict[int, tuple] = {}  # request id -> (handle, asyncio queue)
        self.ids = itertools.count()
        self.counts = {"prompt_tokens": 0, "decode_steps": 0, "busy_slot_steps": 0, "generated_tokens": 0}
        self.wake: asyncio.Event | None = None

    def submit(self, ids: list[int], config) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self.incoming.append((ids, config, q))
        self.wake.set()
        return q

    async def run(self) -> None:
        import numpy as np
        import openvino as ov

        self.wake = asyncio.Event()
        while True:
            if not self.active and not self.incoming:
                await self.wake.wait()
                self.wake.clear()
            while self.incoming:
                ids, config, q = self.incoming.pop(0)
                rid = next(self.ids)
                handle = self.pipe.add_request(rid, ov.Tensor(np.array([ids], dtype=np.int64)), config)
                self.counts["prompt_tokens"] += len(ids)
                self.active[rid] = (handle, q)
            running = sum(1 for h, _ in self.active.values() if not _finished(self.g, h))
            self.pipe.step()
            self.counts["decode_steps"] += 1
            self.counts["busy_slot_steps"] += running
            for rid, (handle, q) in list(self.active.items()):
                if handle.can_read():
                    for out in handle.read().values():
                        self.counts["generated_tokens"] += len(out.generated_ids)
                        q.put_nowait(list(out.generated_ids))
                if _finished(self.g, handle):
                    q.put_nowait(None)
                    del self.active[rid]
            for _ in range(3):  # the handlers take their tokens and write them out before the next step
                await asyncio.sleep(0)

    def config(self, body: dict):
        c = self.g.GenerationConfig()
        c.max_new_tokens = int(body.get("max_tokens") or 256)
        c.ignore_eos = bool(body.get("ignore_eos", False))
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        if temperature > 0:
            c.do_sample, c.temperature, c.top_p = True, temperature, float(body.get("top_p") or 1.0)
        if self.tok.eos_token_id is not None:
            c.eos_token_id = int(self.tok.eos_token_id)
        return c


def _finished(g, handle) -> bool:
    return handle.get_status() != g.py_openvino_genai.GenerationStatus.RUNNING


def app(engine: Engine, alias: str):
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import PlainTextResponse, StreamingResponse

    api = FastAPI(title=f"farm: {TITLE}")

    @api.on_event("startup")
    async def start_stepping():
        api.state.stepper = asyncio.create_task(engine.run())

    @api.get("/health")
    def health():
        return {"status": "ok"}

    @api.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": alias, "object": "model", "owned_by": "farm"}]}

    @api.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        counts = {**engine.counts, "requests_processing": len(engine.active)}
        m = engine.pipe.get_metrics()
        counts["cache_usage"] = float(m.cache_usage)
        return "".join(f"farm_openvino:{k} {v}\n" for k, v in counts.items())

    async def generate(body: dict, ids: list[int], chat: bool):
        if not ids:
            raise HTTPException(400, "empty prompt")
        q = engine.submit(ids, engine.config(body))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        stream = bool(body.get("stream"))
        usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
        made = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def chunk(text: str, finish=None) -> dict:
            choice = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": text} if text else {}
            else:
                choice["text"] = text
            return {"id": rid, "object": obj + (".chunk" if chat else ""), "created": made, "model": alias,
                    "choices": [choice]}

        async def tokens():
            out: list[int] = []
            text = ""
            while (new := await q.get()) is not None:
                out += new
                full = engine.tok.decode(out, skip_special_tokens=True)
                if full.endswith("\ufffd"):  # a partial UTF-8 character: wait for the rest
                    continue
                yield full[len(text):], len(out)
                text = full
            yield None, len(out)

        usage = lambda n: {"prompt_tokens": len(ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(ids) + n}
        if not stream:
            parts, n = [], 0
            async for piece, n in tokens():
                if piece:
                    parts.append(piece)
            finish = "length" if n >= engine.config(body).max_new_tokens else "stop"
            c = chunk("".join(parts), finish)
            if chat:
                c["choices"][0] = {"index": 0, "finish_reason": finish,
                                   "message": {"role": "assistant", "content": "".join(parts)}}
            c["object"] = obj
            return {**c, "usage": usage(n)}

        async def events():
            n = 0
            async for piece, n in tokens():
                if piece is None:
                    break
                yield f"data: {json.dumps(chunk(piece))}\n\n"
            finish = "length" if n >= engine.config(body).max_new_tokens else "stop"
            yield f"data: {json.dumps(chunk('', finish))}\n\n"
            if usage_wanted:
                yield f"data: {json.dumps({'id': rid, 'object': obj, 'choices': [], 'usage': usage(n)})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = prompt
        elif isinstance(prompt, str):
            ids = engine.tok(prompt, add_special_tokens=True)["input_ids"]
        else:
            raise HTTPException(400, "prompt: one string or one list of token ids")
        return await generate(body, ids, chat=False)

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HTTPException(400, "messages: a non-empty list of {role, content}")
        if not engine.tok.chat_template:
            raise HTTPException(400, "this model's tokenizer has no chat template; use /v1/completions")
        ids = engine.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return await generate(body, list(ids), chat=True)

    return api


def server(model_dir: Path, workdir: Path, threads: int, parallel: int, n_ctx: int, host: str = "127.0.0.1",
           port: int | None = None, alias: str | None = None, ready_timeout: float | None = None) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "farm.serve.openvino_server", "--model", str(model_dir), "--host", host,
           "--port", str(port), "--threads", str(threads), "--parallel", str(parallel), "--n-ctx", str(n_ctx),
           "--alias", alias or Path(model_dir).name]
    kw = {"ready_timeout": ready_timeout} if ready_timeout else {}
    return Server(cmd, TITLE, workdir / "openvino-server.log", host, port, **kw)


def settings(srv: Server) -> dict[str, str]:
    import openvino_genai

    return {"engine": f"openvino-genai {openvino_genai.__version__}"}


async def counters(url: str) -> dict[str, float]:
    m = prometheus(await asyncio.to_thread(get_text, f"{url}/metrics"))
    return {"prompt_tokens": m["farm_openvino:prompt_tokens"], "cached_prompt_tokens": None,
            "decode_steps": m["farm_openvino:decode_steps"], "busy_slot_steps": m["farm_openvino:busy_slot_steps"],
            "running": m["farm_openvino:requests_processing"]}


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--alias", default=None)
    a = p.parse_args()
    engine = Engine(a.model, a.threads, a.parallel, a.n_ctx)
    uvicorn.run(app(engine, a.alias or a.model.name), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
