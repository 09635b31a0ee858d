"""Serving engines on the tiny model, on 127.0.0.1, bounded: llama.cpp's llama-server for a GGUF and OpenVINO
GenAI's ContinuousBatchingPipeline for an IR answer the OpenAI API (completions, chat with the model's
template, streaming, models); concurrent requests are batched together (the engine's own count of sequences
per decode step); a shared prompt prefix is taken from llama-server's cache (its counters); the load
client's token counts agree with the engine's."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.request

import pytest

from farm.plan import grid
from farm.serve import engine
from farm.serve.bench import mlflow_metrics, table
from farm.stages import runner as stages
from farm.sweep import spec

pytestmark = pytest.mark.slow
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SERVE = {"cells": "all", "concurrency": [1, 4], "requests": 8, "prompt_tokens": 48, "output_tokens": 256,
         "shared_prefix_tokens": 32, "threads": 2, "timeout_s": 300}


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a chat template in its tokenizer config (the GGUF converter carries it over)."""
    out = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(tiny_model_dir, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def served(chat_model_dir, storage_root):
    """The serve stage of a GGUF F16 and an OpenVINO fp32 cell, run inline after what they depend on.
    llama-server runs without its host-memory prompt cache (--cache-ram 0): on a model this small, saving idle
    slots into it when a burst of requests arrives takes as long as their whole generation and staggers them,
    which hides the batching this test is about; a slot's own KV cache still serves shared prefixes."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FARM_LLAMA_SERVER_ARGS", "--cache-ram 0")
    sweep = spec.parse({
        "name": "tiny-serve", "base": {"model": str(chat_model_dir)},
        "data": {"calib_tokens": 2048, "eval_windows": 2, "eval_window_tokens": 64},
        "exports": [{"format": "gguf", "quant": "F16"}, {"format": "openvino", "quant": "fp32"}],
        "serve": SERVE,
    })
    g = grid.build(sweep)
    cells = {c.spec["export"]["format"]: c for c in g.cells if c.stages.get("serve")}
    assert set(cells) == {"gguf", "openvino"}  # the torch baseline has no serving engine
    results = {}
    for stage in g.closure([c.stages.get("serve") for c in cells.values()]):
        results[stage.id] = stages.run_stage(stage, [results[d] for d in stage.deps])
    mp.undo()
    return {fmt: results[c.stages.get("serve")] for fmt, c in cells.items()}, g, cells


def level(result, name, concurrency):
    return next(lv for lv in result["serve"]["levels"][name] if lv["concurrency"] == concurrency)


def test_llama_server_batches_concurrent_requests_and_reuses_a_shared_prefix(served):
    results, _, _ = served
    r = results["gguf"]
    print(table(r["serve"]))
    one, four = level(r, "distinct", 1), level(r, "distinct", 4)
    assert four["client_peak_in_flight"] == 4
    # continuous batching: at concurrency 4 llama-server decodes several sequences per step (3.9-4.0 on most
    # runs; a one-off stall of ~50 ms as a level starts can stagger the tiny model's short requests); served one
    # after another they would be 1.0, as alone
    assert one["engine_seqs_per_decode"] == pytest.approx(1.0, abs=0.05)
    assert four["engine_seqs_per_decode"] > 1.5, four
    # every token the client counted, the engine says it predicted (8 requests x 256 tokens per level)
    assert one["output_tokens"] == four["output_tokens"] == 8 * 256
    # the prompt cache: distinct prompts reuse nothing; of 8 prompts sharing 32 of their 48 tokens, one at a
    # time, all but the first take the prefix from the cache (7 x 32 of 8 x 48 tokens); four at a time, at
    # least the second wave of four does (4 x 32)
    def frac(lv):
        return lv["engine_cached_prompt_tokens"] / (lv["engine_cached_prompt_tokens"] + lv["engine_prompt_tokens"])

    assert frac(four) < 0.05  # a BOS token and the odd common first token
    assert frac(level(r, "shared_prefix", 1)) == pytest.approx(7 * 32 / (8 * 48), abs=0.03)
    assert frac(level(r, "shared_prefix", 4)) >= 4 * 32 / (8 * 48) - 0.02
    assert r["serve"]["settings"]["cpu_variant"] not in ("unknown", "sapphirerapids")  # AMX off by default
    steps = {(k, s) for k, _, s in mlflow_metrics(r["serve"])}
    assert {("serve_output_tok_s", 1), ("serve_output_tok_s", 4), ("serve_prefix_cached_prompt_frac", 4)} <= steps
    assert not [k for k, _ in steps if "_c1" in k or "_c4" in k]  # per-level scalars only when a sweep names them
    named = [(k, v, s) for k, v, s in mlflow_metrics(r["serve"], {"serve_itl_p90_ms_c4"}) if k.endswith("_c4")]
    assert named == [("serve_itl_p90_ms_c4", four["itl_p90_ms"], 0)]
    assert not list((stages.storage.stage_dir(r["stage"]) / "engine").glob("*.so"))  # no library links stored


def test_openvino_continuous_batching_runs_requests_together(served):
    results, _, _ = served
    r = results["openvino"]
    print(table(r["serve"]))
    one, four = level(r, "distinct", 1), level(r, "distinct", 4)
    assert four["client_peak_in_flight"] == 4
    assert one["engine_seqs_per_decode"] == pytest.approx(1.0, abs=0.05)
    assert four["engine_seqs_per_decode"] > 1.5, four
    assert four["output_tokens"] == 8 * 256 and four["prompt_tokens_mean"] > 30


@pytest.mark.parametrize("fmt", ["gguf", "openvino"])
def test_engine_answers_the_openai_api(served, fmt, tmp_path):
    """/health, /v1/models, /v1/completions (plain and streamed) and /v1/chat/completions through the model's
    chat template, asked with the openai client."""
    from openai import OpenAI

    results, g, cells = served
    cell = cells[fmt]
    runtime = dict(cell.spec["export"]["runtime"])
    eng = engine(runtime.pop("name"))
    artifact = stages.stored_result(g.stages[cell.export].name)["artifact"]
    with eng.server(artifact, tmp_path / "engine", 2, 2, 1024, alias="tiny", **runtime) as srv:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="none")
        assert [m.id for m in client.models.list().data] == ["tiny"]
        done = client.completions.create(model="tiny", prompt="The if statement", max_tokens=6, temperature=0)
        assert done.choices[0].text and done.usage.completion_tokens <= 6
        parts = [e.choices[0].text for e in client.completions.create(
            model="tiny", prompt="The if statement", max_tokens=6, temperature=0, stream=True) if e.choices]
        assert "".join(parts) == done.choices[0].text  # streamed greedy = plain greedy
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=5, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 3
        with urllib.request.urlopen(f"{srv.url}/health", timeout=5) as resp:
            assert resp.status == 200


def test_a_dead_engine_is_reported_as_its_death(tmp_path):
    """An engine that dies while it starts is named with its signal, not as a refused connection."""
    import sys

    from farm.serve.common import EngineDied, Server

    code = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    srv = Server([sys.executable, "-c", code], "test engine", tmp_path / "log", "127.0.0.1", 1)
    with pytest.raises(EngineDied, match="test engine died with SIGSEGV while starting"):
        srv.start()


def test_counters_match_between_client_and_llama_server(served):
    results, _, _ = served
    lv = level(results["gguf"], "shared_prefix", 1)
    # llama-server's own prompt accounting covers what the client sent (computed + cached = all prompt tokens)
    assert lv["engine_prompt_tokens"] + lv["engine_cached_prompt_tokens"] == pytest.approx(
        lv["prompt_tokens_mean"] * lv["requests"], rel=0.02)
    assert asyncio.iscoroutinefunction(engine("llamacpp").counters)
