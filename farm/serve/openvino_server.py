"""OpenVINO IR behind openvino-genai's ContinuousBatchingPipeline, with a small OpenAI-compatible HTTP layer
(FastAPI + uvicorn): /v1/completions, /v1/chat/completions (the model's chat template), streaming,
/v1/models, /health, and Prometheus /metrics.

One task on the event loop owns the pipeline: it takes new requests, calls step() while any is unfinished —
the scheduler batches every running sequence into each step (continuous batching, paged KV cache, prefix
caching) — and hands each request's new tokens to its HTTP handler, which streams them before the next step.
One LLMPipeline must not take concurrent requests (openvino.genai #2480); this pipeline is made for them.
Prompts go in as token ids of the model's own Hugging Face tokenizer: the IR needs no OpenVINO tokenizer.

Every field is checked before the pipeline sees it (OpenAI's ranges, prompt and max_tokens within the context,
token ids in the vocabulary): 400 naming it. A request the pipeline fails anyway gets 500 and the stepping goes
on (if its task ends, /health says 503). --parallel run, --queue wait, more get 429; a client that leaves
mid-stream is cancelled. With FARM_API_KEY set, every route but /health wants `Authorization: Bearer KEY`.

    python -m farm.serve.openvino_server --model DIR --port 8000 --threads 2 --parallel 4 --n-ctx 1024
"""


import argparse
import asyncio
import itertools
import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from farm.serve.common import Server, free_port, get_text, prometheus

TITLE = "OpenVINO GenAI ContinuousBatchingPipeline"
RUNTIME = "openvino"
KV_BLOCK = 32  # tokens per KV-cache block (openvino-genai's CPU default)
QUEUE_PER_SLOT = 4  # requests that may wait for a slot, per slot (--queue)


class Sampling(BaseModel):
    """The fields this server acts on, in OpenAI's ranges; other OpenAI fields (model, stop, ...) pass unread."""

    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    stream: StrictBool = False
    ignore_eos: StrictBool = False
    stream_options: dict | None = None


class Completion(Sampling):
    prompt: StrictStr | list[StrictInt] | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]


class Message(BaseModel):
    role: StrictStr
    content: StrictStr


class Chat(Sampling):
    messages: list[Message] = Field(min_length=1)


class Engine:
    """The pipeline, stepped by one task on the server's event loop: a step runs every scheduled sequence a token
    further (or a chunk of a new prompt), then each stream gets what it produced (a stepping thread would hold the
    GIL through step() and let tokens out in bursts): lists of new token ids, then None, or the error that failed it."""

    def __init__(self, model_dir: Path, threads: int, parallel: int, n_ctx: int, queue: int | None = None):
        import openvino_genai as ov_genai
        from transformers import AutoTokenizer

        self.g = ov_genai
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.vocab = json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size") or len(self.tok)
        self.n_ctx, self.limit = n_ctx, parallel + (QUEUE_PER_SLOT * parallel if queue is None else queue)
        sc = ov_genai.SchedulerConfig()
        sc.max_num_seqs = parallel
        sc.num_kv_blocks = (n_ctx + KV_BLOCK - 1) // KV_BLOCK + parallel  # room for every slot's full sequence
        sc.max_num_batched_tokens = max(256, n_ctx // max(parallel, 1))
        sc.dynamic_split_fuse = True
        sc.enable_prefix_caching = True
        self.pipe = ov_genai.ContinuousBatchingPipeline(
            str(model_dir), sc, "CPU", {"INFERENCE_NUM_THREADS": threads}, {})
        self.tokenizing = ThreadPoolExecutor(1)  # off the event loop (a megabyte prompt), one at a time
        self.incoming: list[tuple] = []
        self.active: dict[int, tuple] = {}  # request id -> (handle, asyncio queue)
        self.ids = itertools.count()
        self.counts = {"prompt_tokens": 0, "decode_steps": 0, "busy_slot_steps": 0, "generated_tokens": 0,
                       "failed_requests": 0, "cancelled_requests": 0}
        self.wake = asyncio.Event()

    def submit(self, ids: list[int], config) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self.incoming.append((ids, config, q))
        self.wake.set()
        return q

    def cancel(self, q: asyncio.Queue) -> None:
        """The client of q has gone: its request leaves the pipeline at the next step."""
        self.incoming = [r for r in self.incoming if r[2] is not q]
        for handle, mine in self.active.values():
            if mine is q and not _finished(self.g, handle):
                handle.cancel()
                self.counts["cancelled_requests"] += 1

    async def run(self) -> None:
        while True:
            if not self.active and not self.incoming:
                await self.wake.wait()
                self.wake.clear()
            self.admit()
            if self.active:
                self.step()
            for _ in range(3):  # the handlers take their tokens and write them out before the next step
                await asyncio.sleep(0)

    def admit(self) -> None:
        import numpy as np
        import openvino as ov

        while self.incoming:
            ids, config, q = self.incoming.pop(0)
            rid = next(self.ids)
            try:
                handle = self.pipe.add_request(rid, ov.Tensor(np.array([ids], dtype=np.int64)), config)
            except Exception as e:  # noqa: BLE001 (whatever the pipeline refuses fails this request alone)
                self.fail({rid: (None, q)}, e)
                continue
            self.counts["prompt_tokens"] += len(ids)
            self.active[rid] = (handle, q)

    def step(self) -> None:
        running = sum(1 for h, _ in self.active.values() if not _finished(self.g, h))
        try:
            self.pipe.step()
        except Exception as e:  # noqa: BLE001 (the step's requests fail; the stepping goes on)
            self.fail(self.active, e)
            self.active = {}
            return
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

    def fail(self, requests: dict, error: Exception) -> None:
        print(f"farm: openvino: {len(requests)} request(s) failed: {error!r}", file=sys.stderr, flush=True)
        for handle, q in requests.values():
            if handle is not None:
                handle.cancel()  # out of the pipeline at its next step
            q.put_nowait(error)
            self.counts["failed_requests"] += 1

    async def prompt_ids(self, fn) -> list[int]:
        return list(await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn))

    def config(self, body: Sampling, n_prompt: int):
        """The request's generation config; its prompt and max_tokens must fit the context (else 400)."""
        from fastapi import HTTPException

        room = self.n_ctx - n_prompt
        if room < 1:
            raise HTTPException(400, f"prompt: {n_prompt} tokens; the context holds {self.n_ctx}, with room for "
                                "at least one new token")
        if body.max_tokens is not None and body.max_tokens > room:
            raise HTTPException(400, f"max_tokens: {body.max_tokens} does not fit the context ({self.n_ctx} tokens, "
                                f"{n_prompt} of them the prompt's: at most {room})")
        c = self.g.GenerationConfig()
        c.max_new_tokens = body.max_tokens or min(256, room)
        c.ignore_eos = body.ignore_eos
        temperature = 1.0 if body.temperature is None else body.temperature
        if temperature > 0:
            c.do_sample, c.temperature, c.top_p = True, temperature, body.top_p or 1.0
        if self.tok.eos_token_id is not None:
            c.eos_token_id = int(self.tok.eos_token_id)
        return c


def _finished(g, handle) -> bool:
    return handle.get_status() != g.py_openvino_genai.GenerationStatus.RUNNING


def error(status: int, message: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


def _field(e: dict) -> str:
    """One pydantic error as `field: what is wrong with it`."""
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"][1:]).lstrip(".")
    return "body: not valid JSON" if e["type"] == "json_invalid" else f"{where or 'body'}: {e['msg']}"


def app(engine: Engine, alias: str, api_key: str | None = None):
    import secrets
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(api):
        api.state.stepper = asyncio.create_task(engine.run())
        yield
        api.state.stepper.cancel()

    api = FastAPI(title=f"farm: {TITLE}", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.add_exception_handler(StarletteHTTPException, lambda request, e: error(e.status_code, e.detail, e.headers))
    api.add_exception_handler(RequestValidationError,
                              lambda request, e: error(400, "; ".join(_field(x) for x in e.errors()[:3])))

    if api_key:
        @api.middleware("http")
        async def bearer(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if request.url.path != "/health" and not secrets.compare_digest(given, f"Bearer {api_key}".encode()):
                return error(401, "this server wants an API key: Authorization: Bearer KEY",
                             {"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    @api.get("/health")
    def health():
        task = api.state.stepper
        if task.done():
            why = "cancelled" if task.cancelled() else repr(task.exception())
            return error(503, f"the engine's stepping task has ended ({why}); restart the server")
        return {"status": "ok"}

    @api.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": alias, "object": "model", "owned_by": "farm"}]}

    @api.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        counts = {**engine.counts, "requests_processing": len(engine.active), "requests_waiting": len(engine.incoming)}
        counts["cache_usage"] = float(engine.pipe.get_metrics().cache_usage)
        return "".join(f"farm_openvino:{k} {v}\n" for k, v in counts.items())

    def admissible() -> None:
        if (n := len(engine.incoming) + len(engine.active)) >= engine.limit:
            raise HTTPException(429, f"busy: {n} requests running or waiting; try again shortly", {"Retry-After": "1"})

    async def generate(body: Sampling, ids: list[int], chat: bool):
        if not ids:
            raise HTTPException(400, "prompt: empty")
        bad = next((t for t in ids if not 0 <= t < engine.vocab), None)
        if bad is not None:
            raise HTTPException(400, f"prompt: token id {bad} is not in the vocabulary [0, {engine.vocab})")
        config = engine.config(body, len(ids))
        admissible()
        q = engine.submit(ids, config)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        usage_wanted = bool((body.stream_options or {}).get("include_usage"))
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
                if isinstance(new, Exception):
                    raise new
                out += new
                full = engine.tok.decode(out, skip_special_tokens=True)
                if full.endswith("\ufffd"):  # a partial UTF-8 character: wait for the rest
                    continue
                yield full[len(text):], len(out)
                text = full
            yield None, len(out)

        usage = lambda n: {"prompt_tokens": len(ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(ids) + n}
        finish = lambda n: "length" if n >= config.max_new_tokens else "stop"  # noqa: E731
        if not body.stream:
            parts, n = [], 0
            try:
                async for piece, n in tokens():
                    if piece:
                        parts.append(piece)
            except Exception as e:  # noqa: BLE001 (the pipeline failed this request)
                raise HTTPException(500, f"generation failed: {e}") from None
            finally:
                engine.cancel(q)
            c = chunk("".join(parts), finish(n))
            if chat:
                c["choices"][0] = {"index": 0, "finish_reason": finish(n),
                                   "message": {"role": "assistant", "content": "".join(parts)}}
            c["object"] = obj
            return {**c, "usage": usage(n)}

        async def events():
            n = 0
            try:
                async for piece, n in tokens():
                    if piece is None:
                        break
                    yield f"data: {json.dumps(chunk(piece))}\n\n"
            except Exception as e:  # noqa: BLE001 (the stream ends with the error)
                yield f"data: {json.dumps({'error': {'message': f'generation failed: {e}', 'type': 'server_error'}})}\n\n"
                return
            finally:
                engine.cancel(q)  # a client gone mid-stream: its request stops decoding
            yield f"data: {json.dumps(chunk('', finish(n)))}\n\n"
            if usage_wanted:
                yield f"data: {json.dumps({'id': rid, 'object': obj, 'choices': [], 'usage': usage(n)})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/v1/completions")
    async def completions(body: Completion):
        admissible()
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):  # ["one prompt"]
            prompt = prompt[0]
        ids = prompt if isinstance(prompt, list) else \
            await engine.prompt_ids(lambda: engine.tok(prompt, add_special_tokens=True)["input_ids"])
        return await generate(body, ids, chat=False)

    @api.post("/v1/chat/completions")
    async def chat(body: Chat):
        if not engine.tok.chat_template:
            raise HTTPException(400, "this model's tokenizer has no chat template; use /v1/completions")
        admissible()
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        ids = await engine.prompt_ids(lambda: engine.tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                             tokenize=True))
        return await generate(body, ids, chat=True)

    return api


def server(model_dir: Path, workdir: Path, threads: int, parallel: int, n_ctx: int, host: str = "127.0.0.1",
           port: int | None = None, alias: str | None = None, ready_timeout: float | None = None,
           api_key: str | None = None, queue: int | None = None) -> Server:
    """api_key: passed in the environment, never on a command line; queue: requests that may wait for a slot."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "farm.serve.openvino_server", "--model", str(model_dir), "--host", host,
           "--port", str(port), "--threads", str(threads), "--parallel", str(parallel), "--n-ctx", str(n_ctx),
           "--alias", alias or Path(model_dir).name] + (["--queue", str(queue)] if queue is not None else [])
    kw = {"ready_timeout": ready_timeout} if ready_timeout else {}
    return Server(cmd, TITLE, workdir / "openvino-server.log", host, port, env={"FARM_API_KEY": api_key or ""},
                  api_key=api_key, **kw)


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
    p.add_argument("--queue", type=int, default=None, help="requests that may wait for a slot (default 4 per slot)")
    a = p.parse_args()
    engine = Engine(a.model, a.threads, a.parallel, a.n_ctx, a.queue)
    api = app(engine, a.alias or a.model.name, os.environ.get("FARM_API_KEY") or None)
    uvicorn.run(api, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
