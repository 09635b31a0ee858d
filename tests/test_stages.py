"""The stage chain run inline on a tiny in-process model: base (local dir) -> reference -> prune ->
GGUF F16 -> Q8_0 -> evaluate through llama.cpp and torch -> isolated bench."""

import json
from pathlib import Path

import numpy as np
import pytest

from farm import storage
from farm.plan import grid
from farm.stages import runner as stages
from farm.sweep import spec

SPEED_METRICS = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "token_latency_p50_ms", "token_latency_p90_ms",
                 "peak_rss_mb", "size_mb")

pytestmark = pytest.mark.slow
DATA = {"files": [], "calib_tokens": 1024, "eval_windows": 2, "eval_window_tokens": 64}


@pytest.fixture(scope="module")
def chain(tiny_model_dir, storage_root):
    sweep = spec.parse({
        "name": "tiny", "base": {"model": str(tiny_model_dir)}, "data": DATA,
        "pipelines": [[], [{"method": "prune_layers", "drop": 1, "calib_samples": 2, "seq_len": 64}]],
        "exports": [{"format": "gguf", "quant": ["F16", "Q8_0"]}],
        "bench": {"prompt_tokens": 16, "decode_tokens": 8, "warmup": 1, "repeats": 2, "threads": 1},
    })
    g = grid.build(sweep)
    results = {}
    for sid, stage in g.stages.items():
        results[sid] = stages.run_stage(stage, [results[d] for d in stage.deps])
    return g, results


def test_every_stage_ran_and_published(chain):
    g, results = chain
    for sid, stage in g.stages.items():
        # a benchmark is kept under its machine's name too (bench.reuse: same_host)
        assert (storage.stage_dir(stages.storage_name(stage)) / "result.json").is_file()
        assert (stages.storage_name(stage) != stage.name) == (stage.kind in ("bench", "roofline"))  # the node's
        assert results[sid]["kind"] == stage.kind
        # what ran and how long it took are kept with the result (its cost: a training step's on 2 cores)
        stored = json.loads((storage.stage_dir(stages.storage_name(stage)) / "result.json").read_text())
        assert stored["params"] == json.loads(json.dumps(stage.params, default=str))
        assert stored["seconds"] > 0 and stored["stage"] == stages.storage_name(stage)
    assert not list((storage.root() / "stages").glob(".*tmp-*"))


def test_the_ledger_has_a_line_per_stage_run_and_none_for_a_reused_one(chain):
    import time

    g, results = chain
    names = sorted(stages.storage_name(s) for s in g.stages.values())
    ran = [e for e in stages.ledger() if e["stage"] in names]
    assert sorted(e["stage"] for e in ran) == names and stages.reruns(ran) == []
    again = time.time()
    for stage in g.stages.values():  # every result is stored: all reused, nothing run, no line
        assert stages.run_stage(stage, [results[d] for d in stage.deps])["cached"] is True
    assert [e for e in stages.ledger(since=again) if e["stage"] in names] == []
    # a run that starts after another run of the same stage ended is a rerun; overlapping runs are not
    e = ran[0]
    overlapping = {**e, "ended": e["ended"] + 5}
    later = {**e, "started": e["ended"] + 1, "ended": e["ended"] + 2}
    assert stages.reruns([e, overlapping]) == [] and stages.reruns([overlapping, e, later]) == [(e, later)]


def test_pruned_model_is_smaller_and_loads(chain):
    g, results = chain
    [comp] = [results[s.id] for s in g.stages.values() if s.kind == "compress"]
    cfg = json.loads((Path(comp["model_dir"]) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and len(comp["info"]["dropped_layers"]) == 1


def test_quality_through_runtimes(chain):
    g, results = chain
    by_cell = {(c.spec["export"]["quant"], bool(c.spec["compress"])): results[c.stages.get("evaluate")]["metrics"] for c in g.cells}
    base_torch, f16, q8 = by_cell[("fp32", False)], by_cell[("F16", False)], by_cell[("Q8_0", False)]
    assert abs(base_torch["kl_div"]) < 1e-3 and base_torch["top1_agree"] == 1.0
    # llama.cpp F16 of the same weights agrees closely with the torch base; Q8_0 a little less
    assert f16["kl_div"] < 0.01 and abs(f16["perplexity"] / base_torch["perplexity"] - 1) < 0.01
    assert q8["kl_div"] >= 0 and q8["top1_agree"] > 0.5
    pruned = by_cell[("F16", True)]
    assert pruned["kl_div"] > f16["kl_div"]


def test_bench_metrics(chain):
    g, results = chain
    for c in g.cells:
        m = results[c.stages.get("bench")]["metrics"]
        for k in SPEED_METRICS:
            assert np.isfinite(m[k]) and m[k] > 0, k
        assert m["token_latency_p90_ms"] >= m["token_latency_p50_ms"]
        raw = json.loads(Path(results[c.stages.get("bench")]["bench_json"]).read_text())
        assert len(raw["raw"]["used"]) == 2 and all(len(r["step_s"]) == 8 for r in raw["raw"]["used"])
        assert raw["threads"] == 1
        # the memory roofline (a stage of its own, after the benchmark): bytes a decode step reads, from the
        # artifact, against the node's bandwidth
        r = results[c.stages["roofline"]]["metrics"]
        assert r["bytes_per_token_mb"] >= r["weight_mb_per_token"] > 0 and r["mem_bandwidth_gbs"] > 0
        assert r["roofline_efficiency"] == pytest.approx(m["decode_tok_s"] / r["roofline_decode_tok_s"])
    weights = {c.spec["export"]["quant"]: results[c.stages["roofline"]]["metrics"]["weight_mb_per_token"]
               for c in g.cells if not c.spec["compress"]}
    assert weights["Q8_0"] < 0.6 * weights["F16"] < 0.6 * weights["fp32"]  # 8.5 vs 16 vs 32 bits a weight


def test_second_run_is_cached(chain):
    g, results = chain
    stage = next(s for s in g.stages.values() if s.kind == "export")
    again = stages.run_stage(stage, [results[d] for d in stage.deps])
    assert again["cached"] and again["artifact"] == results[stage.id]["artifact"]


def test_block_influence_finds_an_identity_block(tiny_model_dir):
    import torch

    from farm.compress.prune_layers import block_influence
    from farm.inputs.models import load_model

    model = load_model(tiny_model_dir)
    with torch.no_grad():  # block 2 adds nothing to the residual stream: it is an identity
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = block_influence(model, [torch.randint(0, 1000, (1, 32))])
    assert int(np.argmin(scores)) == 2 and scores[2] < 1e-5
