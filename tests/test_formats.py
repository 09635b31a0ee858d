"""ONNX Runtime and OpenVINO cells run inline on a tiny in-process model: optimum's exports, ONNX
Runtime's and NNCF's quantizers, quality through each runtime against the torch base, one isolated
benchmark per format."""

from pathlib import Path

import numpy as np
import pytest

from farm import storage
from farm.errors import ToolError
from farm.export import FORMATS
from farm.plan import grid
from farm.stages import runner as stages
from farm.sweep import spec

pytestmark = pytest.mark.slow
DATA = {"files": [], "calib_tokens": 1024, "eval_windows": 2, "eval_window_tokens": 64}
CALIB = {"calib_samples": 2, "calib_seq_len": 64, "group_size": 32}


@pytest.fixture(scope="module")
def formats(tiny_model_dir, storage_root):
    sweep = spec.parse({
        "name": "tiny-formats", "base": {"model": str(tiny_model_dir)}, "data": DATA,
        "exports": [{"format": "onnx", "quant": ["fp32", "int8", "int4"], "algorithm": ["rtn", "gptq"], **CALIB},
                    {"format": "onnx", "builder": "genai", "quant": ["fp32", "int4"], "group_size": 32},
                    {"format": "openvino", "quant": ["fp32", "fp16", "int8", "int4_asym"],
                     "algorithm": ["rtn", "awq_se"], **CALIB}],
        "bench": {"prompt_tokens": 16, "decode_tokens": 8, "warmup": 0, "repeats": 1, "threads": 1},
    })
    g = grid.build(sweep)
    cells = {"-".join(str(v) for k, v in c.spec["export"].items() if k in ("format", "quant", "algorithm"))
             .replace("onnx-", "onnx_genai-" if c.spec["export"].get("builder") == "genai" else "onnx-"): c
             for c in g.cells}
    benched = {cells[n].stages.get("bench") for n in ("onnx-fp32", "onnx-int4-rtn", "onnx_genai-int4", "openvino-fp32",
                                        "openvino-int4_asym-rtn")}
    results = {}
    for sid, stage in g.stages.items():
        if (stage.kind != "bench" or sid in benched) and all(d in results for d in stage.deps):
            results[sid] = stages.run_stage(stage, [results[d] for d in stage.deps])  # one benchmark per kind of level
    return g, results, cells


def test_grid_shares_the_fp32_export_and_feeds_calibration_to_data_aware_levels(formats):
    g, _, cells = formats
    exports = [s for s in g.stages.values() if s.kind == "export"]
    for fmt in ("onnx", "openvino"):
        [fp32] = [s for s in exports if s.params == {"format": fmt, "quant": "fp32"}]
        derived = [s for s in exports if s.params["format"] == fmt and s.params["quant"] != "fp32"
                   and "builder" not in s.params]  # the genai builder makes every level itself
        assert derived and all(s.deps[0] == fp32.id for s in derived)
        for s in derived:  # only data-aware algorithms read the reference's calibration tokens
            aware = FORMATS.options(fmt).DATA_AWARE
            assert (len(s.deps) == 2) == (s.params.get("algorithm") in aware)
    assert {"onnx-int4-gptq", "openvino-int4_asym-awq_se", "openvino-fp16", "torch-fp32"} <= set(cells)


def test_fp32_exports_match_the_torch_base(formats):
    _, results, cells = formats
    for name in ("onnx-fp32", "onnx_genai-fp32", "openvino-fp32"):
        m = results[cells[name].stages.get("evaluate")]["metrics"]
        assert m["kl_div"] < 1e-3 and m["top1_agree"] > 0.99, (name, m)


def test_quantized_levels_are_smaller_and_measured(formats):
    _, results, cells = formats
    size = {n: results[c.export]["size_mb"] for n, c in cells.items()}
    # the tiny model is mostly its 49152 x 64 embedding table, which onnx int8 keeps in fp32 (tied)
    assert size["onnx-int8"] < size["onnx-fp32"]
    for fmt, levels in (("onnx", ["int4-rtn", "int4-gptq"]), ("openvino", ["fp16", "int8", "int4_asym-rtn"])):
        for level in levels:
            assert size[f"{fmt}-{level}"] < 0.6 * size[f"{fmt}-fp32"], (fmt, level, size)
            m = results[cells[f"{fmt}-{level}"].stages.get("evaluate")]["metrics"]
            assert np.isfinite(m["perplexity"]) and m["kl_div"] >= 0 and 0 < m["top1_agree"] <= 1
    assert size["onnx-int4-rtn"] < size["onnx-int8"]
    assert size["onnx_genai-int4"] < 0.6 * size["onnx_genai-fp32"]  # the tied table shared in 4 bits


def test_onnx_int4_quantizes_the_tied_lm_head_and_the_embedding(formats):
    import onnx

    _, results, cells = formats
    path = Path(results[cells["onnx-int4-rtn"].export]["artifact"]) / "model.onnx"
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    assert "GatherBlockQuantized" in ops and "MatMul" in ops  # MatMuls left: attention's, no weights
    model = onnx.load(str(path))
    const = {i.name for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and any(i in const for i in n.input)]


def test_openvino_fp32_runs_in_f32_and_benches_in_a_fresh_process(formats):
    _, results, cells = formats
    bench = results[cells["openvino-fp32"].stages.get("bench")]
    assert bench["runtime_settings"]["INFERENCE_PRECISION_HINT"] == "<Type: 'float32'>"
    for name in ("onnx-fp32", "onnx-int4-rtn", "onnx_genai-int4", "openvino-int4_asym-rtn"):
        m = results[cells[name].stages.get("bench")]["metrics"]
        assert m["decode_tok_s"] > 0 and m["prefill_tok_s"] > 0 and m["peak_rss_mb"] > 0
    weights = {n: results[cells[n].stages["roofline"]]["metrics"]["weight_mb_per_token"] for n in
               ("onnx-fp32", "onnx-int4-rtn", "openvino-fp32", "openvino-int4_asym-rtn")}
    # the tiny model is mostly its tied 49152 x 64 table, which the lm_head reads whole every token
    assert weights["onnx-int4-rtn"] < 0.6 * weights["onnx-fp32"], weights
    assert weights["openvino-int4_asym-rtn"] < 0.6 * weights["openvino-fp32"], weights
    assert abs(weights["onnx-fp32"] / weights["openvino-fp32"] - 1) < 0.05, weights  # same weights, two formats


def test_generate_through_each_runtime_matches_torch(formats, tiny_model_dir):
    from farm.runtimes import load

    _, results, cells = formats
    want = load("torch", tiny_model_dir, threads=1, n_ctx=64).generate("Hello there", max_tokens=6)
    for name in ("onnx-fp32", "onnx_genai-fp32", "openvino-fp32"):
        runtime = cells[name].spec["export"]["runtime"]
        rt = load(runtime, results[cells[name].export]["artifact"], threads=1, n_ctx=64)
        assert rt.generate("Hello there", max_tokens=6) == want, name


def test_incomplete_export_is_refused(tmp_path):
    from farm.export.onnx_export import check_complete

    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ToolError, match="tokenizer.json missing"):
        check_complete(tmp_path)


def test_directory_checksum_sees_every_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x")
    before = storage.sha256(tmp_path)
    (tmp_path / "b.txt").write_text("y")
    assert storage.sha256(tmp_path) != before
