"""The serve benchmark's pure parts: the sweep's serve section, which cells it picks, and the load client's
timing — checked against a scripted OpenAI-style stream whose delays are known."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from farm.decide import pareto
from farm.errors import SpecError
from farm.serve.common import free_port
from farm.serve.loadgen import prompts_from_ids, run_level
from farm.sweep.spec import better, parse

BASE = {"name": "s", "exports": [{"format": "gguf", "quant": "F16"}]}


def test_serve_section_defaults_and_refusals():
    sweep = parse({**BASE, "serve": {}})
    assert sweep.serve.concurrency == [1, 2, 4] and sweep.serve.cells == "format_front"
    with pytest.raises(SpecError, match=r"serve\.concurrency.*distinct and increasing"):
        parse({**BASE, "serve": {"concurrency": [4, 2]}})
    with pytest.raises(SpecError, match="shared_prefix_tokens .* must be below prompt_tokens"):
        parse({**BASE, "serve": {"prompt_tokens": 64, "shared_prefix_tokens": 64}})
    # prompts never repeat: a benchmark that needs more corpus than the data section holds is refused up front
    with pytest.raises(SpecError, match="serve: its prompts .* take \\d+ corpus tokens.*data.calib_tokens"):
        parse({**BASE, "data": {"calib_tokens": 512, "eval_windows": 1, "eval_window_tokens": 64},
               "serve": {"concurrency": [1, 8], "prompt_tokens": 256}})


def test_serve_metrics_as_objectives_need_every_candidate_served_at_that_level():
    ok = parse({**BASE, "serve": {"cells": "all", "concurrency": [1, 4]},
                "objectives": {"perplexity": "min", "serve_output_tok_s_c4": "max"},
                "constraints": [{"metric": "serve_itl_p90_ms_c4", "max": 50}]})
    assert better("serve_output_tok_s_c4") == "max" and better("serve_prefix_ttft_p50_ms_c1") == "min"
    assert ok.constraints[0].metric == "serve_itl_p90_ms_c4"
    with pytest.raises(SpecError, match="serve_output_tok_s_c8.*needs serve: \\{cells: all, concurrency"):
        parse({**BASE, "serve": {"cells": "all", "concurrency": [1, 4]},
               "objectives": {"perplexity": "min", "serve_output_tok_s_c8": "max"}})
    with pytest.raises(SpecError, match="serve_output_tok_s_c4.*cells: all"):
        parse({**BASE, "serve": {"concurrency": [1, 4]}, "objectives": {"serve_output_tok_s_c4": "max"}})
    with pytest.raises(SpecError, match="objectives"):
        parse({**BASE, "objectives": {"serve_tok_s_c4": "max"}})  # no such serve figure


def row(i, runtime, ppl, tps, baseline=False):
    return {"id": i, "target": "t", "baseline": baseline, "metrics": {"perplexity": ppl, "decode_tok_s": tps},
            "label": i, "_rt": runtime}


def test_served_cells_per_runtime_front():
    rows = [row("base", "torch", 10, 5, baseline=True),
            row("g1", "llamacpp", 11, 100), row("g2", "llamacpp", 12, 150), row("g3", "llamacpp", 13, 90),
            row("o1", "openvino", 11.5, 60), row("o2", "openvino", 30, 200)]  # o2 violates the constraint
    runtime_of = {r["id"]: r["_rt"] for r in rows if r["_rt"] != "torch"}
    obj = {"perplexity": "min", "decode_tok_s": "max"}
    cons = [{"metric": "perplexity", "max_ratio_to_baseline": 1.5}]
    # the sweep's front: g1, g2 (g3 is dominated by g1; o1 by g1); the best two by decode speed first
    assert pareto.served(rows, runtime_of, obj, cons, "front", 2, "decode_tok_s", "max") == ["g2", "g1"]
    # each engine's own front: openvino's o1 is served though g1 dominates it; o2 is infeasible
    assert pareto.served(rows, runtime_of, obj, cons, "format_front", 1, "decode_tok_s", "max") == ["g2", "o1"]
    assert pareto.served(rows, runtime_of, obj, cons, "all", 9, "decode_tok_s", "max") == ["g2", "g1", "g3", "o1"]


def test_prompts_share_exactly_the_prefix_and_never_repeat():
    ids = list(range(1000))
    got = prompts_from_ids(ids, lambda xs: " ".join(map(str, xs)), 3, 10, 4)
    parts = [p.split() for p in got]
    assert all(p[:4] == ["0", "1", "2", "3"] and len(p) == 10 for p in parts)
    assert len({tuple(p[4:]) for p in parts}) == 3
    with pytest.raises(ValueError, match="lower serve.requests"):
        prompts_from_ids(ids, str, 200, 10)


class ScriptedStream:
    """An OpenAI-style streaming /v1/completions whose first token comes after `first` s and each next one
    `gap` s later, on 127.0.0.1; with `close`, a closing chunk (finish_reason, no text) `close` s after the last."""

    def __init__(self, first: float, gap: float, close: float | None = None):
        from aiohttp import web

        self.first, self.gap, self.port, self.active, self.peak = first, gap, free_port(), 0, 0
        self.close_after = close
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        self.runner = web.AppRunner(app)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()
        assert self.ready.wait(10)

    def _serve(self):
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    async def completions(self, request):
        from aiohttp import web

        body = await request.json()
        self.active += 1
        self.peak = max(self.peak, self.active)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(self.first)
        for i in range(body["max_tokens"]):
            if i:
                await asyncio.sleep(self.gap)
            chunk = {"choices": [{"index": 0, "text": f" t{i}"}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if self.close_after is not None:
            await asyncio.sleep(self.close_after)
            done = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
            await resp.write(f"data: {json.dumps(done)}\n\n".encode())
        usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": body["max_tokens"]}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        self.active -= 1
        return resp

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_load_client_times_what_the_stream_does():
    srv = ScriptedStream(first=0.15, gap=0.05)
    try:
        level = run_level(f"http://127.0.0.1:{srv.port}", "m", ["a", "b", "c", "d"], 2, 6)
    finally:
        srv.close()
    assert level["requests"] == 4 and level["output_tokens"] == 24 and level["prompt_tokens_mean"] == 7
    assert srv.peak == 2 and level["client_peak_in_flight"] == 2  # two streams at a time, never more
    assert 140 <= level["ttft_p50_ms"] <= 260, level
    assert 45 <= level["itl_p50_ms"] <= 110, level
    e2e = 150 + 5 * 50  # ms, per request; two rounds of two requests
    assert e2e * 0.95 <= level["e2e_p50_ms"] <= e2e * 1.6, level
    assert level["output_tok_s"] == pytest.approx(24 / level["wall_s"])
    assert 2 * e2e / 1e3 * 0.95 <= level["wall_s"] <= 2 * e2e / 1e3 * 1.6


def test_the_closing_chunk_of_a_stream_is_not_timed_as_a_token():
    """Both engines end a stream with a chunk that has a finish_reason and no text; timing it as a token put a
    fake inter-token gap (the engine's wrap-up) into every request's ITL."""
    srv = ScriptedStream(first=0.05, gap=0.05, close=0.4)
    try:
        level = run_level(f"http://127.0.0.1:{srv.port}", "m", ["a", "b"], 1, 4)
    finally:
        srv.close()
    assert level["itl_p90_ms"] < 200, level  # the 400 ms wrap-up is not an inter-token latency
    assert level["output_tokens"] == 8


HEALTHY = ("import http.server, sys\n"
           "class H(http.server.BaseHTTPRequestHandler):\n"
           "    def do_GET(self):\n"
           "        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
           "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")


def test_an_engine_does_not_outlive_the_process_that_started_it(tmp_path):
    """Its owner killed outright (SIGKILL: no handler, no context manager runs), the engine still goes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    owner = ("import sys, time\nfrom farm.serve.common import Server\n"
             f"srv = Server([sys.executable, '-c', {HEALTHY!r}, '{port}'], 'test engine', {str(tmp_path / 'log')!r}, "
             f"'127.0.0.1', {port})\nsrv.start()\nprint(srv.proc.pid, flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", owner], stdout=subprocess.PIPE, text=True)
    engine_pid = int(proc.stdout.readline())
    os.kill(engine_pid, 0)  # running
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for _ in range(50):
        try:
            os.kill(engine_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(engine_pid, signal.SIGKILL)
    raise AssertionError("the engine outlived its owner")


def test_farm_serve_refuses_a_model_whose_file_is_not_what_was_measured(tmp_path, monkeypatch):
    """`farm serve` resolves models:/NAME@ALIAS to the promoted file and its measured runtime, and refuses it
    when the file's checksum is not the one recorded at measurement (in-process sqlite MLflow)."""
    import mlflow
    import yaml
    from mlflow.tracking import MlflowClient

    from farm import storage
    from farm.decide.deploy import resolve
    from farm.errors import FarmError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    model = tmp_path / "model"
    (model / "artifacts").mkdir(parents=True)
    (model / "artifacts" / "m.gguf").write_bytes(b"GGUF weights as measured")
    (model / "artifacts" / "run.json").write_text(json.dumps({"runtime": {"name": "llamacpp", "amx": False},
                                                              "threads": 2}))
    (model / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {"artifacts": {
        "model": {"path": "artifacts/m.gguf"}, "meta": {"path": "artifacts/run.json"}}}}}))
    c = MlflowClient()
    run = c.create_run(c.create_experiment("e", artifact_location=str(tmp_path / "store")))
    c.log_artifacts(run.info.run_id, str(model), "model")
    c.create_registered_model("m")
    good = storage.sha256(model / "artifacts" / "m.gguf")
    for alias, sha in (("measured", good), ("edited", "0" * 64)):
        v = c.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id,
                                   tags={"farm.artifact_sha256": sha})
        c.set_registered_model_alias("m", alias, v.version)
    got = resolve("models:/m@measured", tmp_path / "dl1")
    assert got["runtime"] == {"name": "llamacpp", "amx": False} and got["threads"] == 2
    assert got["artifact"].read_bytes() == b"GGUF weights as measured"
    with pytest.raises(FarmError, match="does not match the checksum recorded when it was measured"):
        resolve("models:/m@edited", tmp_path / "dl2")
    with pytest.raises(FarmError, match="no such registered model version"):
        resolve("models:/m@nothing", tmp_path / "dl3")


def test_an_sft_cells_adapter_reaches_its_run_and_farm_serve_lora_finds_it(tmp_path, monkeypatch):
    """A cell whose sft step kept an adapter GGUF logs it to its run (adapter/, with its checksum); `farm serve
    --lora` takes it as runs:/RUN_ID or as models:/NAME@ALIAS of a version promoted from that cell, and refuses
    one whose bytes are not what the run recorded, a run without an adapter and a missing file."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from farm.decide.deploy import adapter
    from farm.errors import FarmError
    from farm.plan import grid as gridmod
    from farm.record import cells, outbox
    from farm.sweep.spec import loads

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    stage = tmp_path / "compress-x"
    (stage / "adapter").mkdir(parents=True)
    (stage / "adapter" / "adapter-f16.gguf").write_bytes(b"GGUF lora tensors")
    step = {"params": {"step": {"method": "sft"}}, "model_dir": str(stage / "model"),
            "info": {"steps": 3, "adapter_gguf": "adapter/adapter-f16.gguf"}}
    g = gridmod.build(loads("name: a\nbase: {model: smollm2-135m-instruct}\npipelines: [[], [{method: sft, "
                            "task: arc_easy}]]\nexports: [{format: gguf, quant: [F16]}]"))
    cell, plain = (next(c for c in g.cells if bool(c.spec["compress"]) is want) for want in (True, False))
    c = MlflowClient()
    exp = c.create_experiment("a", artifact_location=str(tmp_path / "store"))
    parent = c.create_run(exp).info.run_id
    runs = {}
    for name, cl, steps in (("sft", cell, [step]), ("plain", plain, [])):
        record = cells.cell_record(exp, parent, cl, None, {}, None, None, steps=steps)
        outbox._deliver(c, record, tmp_path / f"{name}.json")
        runs[name] = record["run_id"]
    tags = c.get_run(runs["sft"]).data.tags
    assert tags["farm.adapter"] == "adapter/adapter-f16.gguf"
    got = adapter(f"runs:/{runs['sft']}", tmp_path / "dl1")
    assert got.read_bytes() == b"GGUF lora tensors"
    c.create_registered_model("a")
    v = c.create_model_version("a", f"runs:/{runs['sft']}/model", runs["sft"])
    c.set_registered_model_alias("a", "tuned", v.version)
    assert adapter("models:/a@tuned", tmp_path / "dl2").read_bytes() == b"GGUF lora tensors"
    with pytest.raises(FarmError, match="logged no adapter: only a cell with an sft step has one"):
        adapter(f"runs:/{runs['plain']}", tmp_path / "dl3")
    c.set_tag(runs["sft"], "farm.adapter_sha256", "0" * 64)
    with pytest.raises(FarmError, match="does not match the checksum its run recorded"):
        adapter(f"runs:/{runs['sft']}", tmp_path / "dl4")
    with pytest.raises(FarmError, match="no such adapter file"):
        adapter(str(tmp_path / "nowhere.gguf"), tmp_path / "dl5")


def test_llama_server_is_given_absolute_paths_because_it_runs_in_its_workdir(tmp_path, monkeypatch):
    """A model and adapter named relative to the caller's directory must still be found by the server, whose
    working directory is its own workdir (where its CPU backends are linked)."""
    from farm.serve.llamacpp_server import server

    monkeypatch.chdir(tmp_path)
    for model, adapter in ((Path("model.gguf"), Path("ad/a.gguf")), ("model.gguf", "ad/a.gguf")):  # Path or str
        srv = server(model, tmp_path / "engine", 1, 1, 256, lora=[adapter])
        cmd = srv.cmd
        assert cmd[cmd.index("-m") + 1] == str(tmp_path / "model.gguf")
        assert cmd[cmd.index("--lora-scaled") + 1] == f"{tmp_path / 'ad' / 'a.gguf'}:1.0"
        assert srv.proc is None  # built, not started
