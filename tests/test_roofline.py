"""The memory roofline (farm/measure/roofline.py, a stage kind of its own: farm/stages/roofline.py): bytes a decode step reads, per format, counted from the artifact
without the embedding table (read one row per token) unless it is also the lm_head; the bandwidth cache."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from farm.measure import roofline


def _gguf(path, tied: bool):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.zeros((100, 64), np.float16))
    if not tied:
        w.add_tensor("output.weight", np.zeros((100, 64), np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_bytes_leave_out_an_untied_embedding_table(tmp_path, tied):
    path = _gguf(tmp_path / "m.gguf", tied)
    got = roofline.bytes_per_token("gguf", path, context=10, settings={})
    table, block = 100 * 64 * 2, 64 * 64 * 4
    assert got["weight_bytes"] == table + block  # the lm_head (output, or the tied table) and the block
    # KV: keys and values, 2 layers, 2 KV heads of 64/4 = 16, f16, 10 positions
    assert got["kv_bytes"] == 2 * 2 * 2 * 16 * 2 * 10


def _onnx(path, tied: bool):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.ones((100, 8), np.float32), "emb")
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    inits = [emb, w]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h0"]), helper.make_node("MatMul", ["h0", "w"], ["h1"])]
    if tied:
        nodes += [helper.make_node("Transpose", ["emb"], ["embT"]), helper.make_node("MatMul", ["h1", "embT"], ["logits"])]
    else:
        inits.append(numpy_helper.from_array(np.ones((8, 100), np.float32), "lm_head"))
        nodes.append(helper.make_node("MatMul", ["h1", "lm_head"], ["logits"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    path.mkdir()
    onnx.save(helper.make_model(graph), str(path / "model.onnx"))
    (path / "config.json").write_text(json.dumps({"num_hidden_layers": 1, "num_attention_heads": 2,
                                                  "num_key_value_heads": 1, "hidden_size": 8}))
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_onnx_bytes_count_a_table_only_where_a_matmul_reads_it(tmp_path, tied):
    got = roofline.bytes_per_token("onnx", _onnx(tmp_path / "m", tied), context=0, settings={})
    assert got["weight_bytes"] == 100 * 8 * 4 + 8 * 8 * 4  # lm_head (own or tied) + w; the gather-only table not


def test_torch_bytes_match_the_loaded_model(tiny_model_dir):
    from farm.inputs.models import load_model

    model = load_model(tiny_model_dir)
    tied = bool(model.config.tie_word_embeddings)
    want = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if tied or "embed_tokens" not in n)
    got = roofline.bytes_per_token("torch", tiny_model_dir, context=0, settings={})
    assert got["weight_bytes"] == want


def test_bitsandbytes_weights_count_at_their_packed_size(tiny_model_dir, tmp_path):
    """NF4 packs two weights in a U8 byte, LLM.int8 stores I8: each counted at 1 byte, not 4."""
    import shutil

    from safetensors.numpy import save_file

    d = tmp_path / "torch-nf4"
    shutil.copytree(tiny_model_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({"model.layers.0.mlp.down_proj.weight": np.zeros((2048, 1), np.uint8),  # 4096 NF4 weights
               "model.layers.0.mlp.down_proj.weight.absmax": np.zeros(64, np.uint8),
               "model.layers.0.mlp.up_proj.weight": np.zeros((64, 64), np.int8),  # LLM.int8
               "model.layers.0.mlp.up_proj.SCB": np.zeros(64, np.float32)}, str(d / "model.safetensors"))
    got = roofline.bytes_per_token("torch", d, context=0, settings={})
    assert got["weight_bytes"] == 2048 + 64 + 64 * 64 + 64 * 4


def test_bandwidth_is_measured_once_per_node_and_threads(tmp_path, monkeypatch):
    from farm.measure import cpuload as bench

    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    monkeypatch.setattr(roofline, "ARRAY_MB", 16)
    host = {"hostname": "h", "model_name": "cpu"}
    monkeypatch.setattr(bench, "CONTAMINATED_CPUS", -1.0)  # every measurement counts as disturbed: none cached
    assert not roofline.bandwidth(1, [0], host)["cached"] and not roofline.bandwidth(1, [0], host)["cached"]
    monkeypatch.setattr(bench, "CONTAMINATED_CPUS", 1e9)  # (this test does not judge the machine's own load)
    first = roofline.bandwidth(1, [0], host)
    assert not first["cached"] and first["read_gbs"] > 0.1 and first["triad_gbs"] > 0.1
    again = roofline.bandwidth(1, [0], host)
    assert again["cached"] and again["read_gbs"] == first["read_gbs"]
    assert not roofline.bandwidth(1, [0], {**host, "hostname": "other"})["cached"]  # another node measures anew


def test_efficiency_is_decode_over_the_ceiling(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    path = _gguf(tmp_path / "m.gguf", tied=True)
    monkeypatch.setattr(roofline, "bandwidth", lambda *a: {"read_gbs": 10.0, "triad_gbs": 9.0, "l3_bytes": 0})
    r = roofline.for_cell("gguf", path, decode_tok_s=100.0, context=0, threads=1, cores=[0], settings={}, host={})
    per = 100 * 64 * 2 + 64 * 64 * 4
    assert r["roofline_decode_tok_s"] == pytest.approx(10e9 / per)
    assert r["roofline_efficiency"] == pytest.approx(100.0 * per / 10e9)
    assert roofline.for_cell("dummy", path, 1.0, 0, 1, [0], {}, {}) == {}  # a format without a byte reader


@pytest.mark.slow
def test_the_roofline_stage_reads_its_cells_benchmark(tmp_path, monkeypatch):
    """The roofline as a measurement of its own (one module, one registry line, this test): in a child process
    pinned to the benchmark's cores, the artifact's bytes per decode step against the node's bandwidth, and the
    benchmark's decode speed over that ceiling."""
    from farm.plan.grid import Stage
    from farm.stages import runner

    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    art = _gguf(tmp_path / "m.gguf", tied=True)
    raw = {"decode_tok_s": 50.0, "threads": 1, "cores": sorted(os.sched_getaffinity(0))[:1], "pinning": "compact",
           "runtime_settings": {}}
    (tmp_path / "bench.json").write_text(json.dumps(raw))
    stage = Stage("r0", "roofline", {"target": {"name": "any", "labels": {}}, "runtime": {"name": "llamacpp"},
                                     "reuse": "always", "context": 10}, ("e0", "b0"))
    export = {"format": "gguf", "quant": "F16", "artifact": str(art), "size_mb": 0.1}
    out = runner.run_stage(stage, [export, {"bench_json": str(tmp_path / "bench.json"), "metrics": {}}])
    m = out["metrics"]
    assert m["bytes_per_token_mb"] == pytest.approx((100 * 64 * 2 + 64 * 64 * 4 + 2 * 2 * 2 * 16 * 2 * 10) / 1e6)
    assert m["mem_bandwidth_gbs"] > 0.1
    assert m["roofline_efficiency"] == pytest.approx(50.0 / m["roofline_decode_tok_s"])
    assert runner.run_stage(stage, [export, {"bench_json": str(tmp_path / "bench.json")}])["cached"] is True
