import json
from pathlib import Path

import pytest
import yaml

from farm.errors import SpecError
from farm.sweep import spec

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs" / "demo.yaml"


def demo() -> dict:
    return yaml.safe_load(DEMO.read_text())


def problems(data) -> list[str]:
    with pytest.raises(SpecError) as e:
        spec.parse(data)
    return e.value.problems


def test_every_job_file_is_valid():
    for f in sorted((ROOT / "jobs").glob("*.yaml")):
        assert spec.load(f).name


def test_misspelt_key_names_the_field():
    d = demo()
    d["bench"]["repaets"] = 3
    [p] = problems(d)
    assert "bench.repaets" in p and "unknown key" in p


def test_wrong_type_names_field_and_value():
    d = demo()
    d["bench"]["decode_tokens"] = "many"
    [p] = problems(d)
    assert p.startswith("bench.decode_tokens:") and '"many"' in p


def test_unknown_method_suggests_the_nearest():
    d = demo()
    d["pipelines"][1][0]["method"] = "prune_layer"
    [p] = problems(d)
    assert p.startswith("pipelines[1][0].method:")
    assert "did you mean 'prune_layers'" in p and "allowed: autoround, awq, distill, gptq" in p and "prune_layers" in p


def test_quant_level_the_format_lacks():
    d = demo()
    d["exports"][0]["quant"] = ["F16", "Q4_KM"]
    [p] = problems(d)
    assert p.startswith("exports[0].quant:") and "Q4_KM" in p and "did you mean 'Q4_K_M'" in p and "Q8_0" in p


def test_missing_model_path():
    d = demo()
    d["base"]["model"] = "/nonexistent/model-dir"
    [p] = problems(d)
    assert p.startswith("base.model:") and "does not exist" in p


def test_unknown_embedded_name_suggests():
    d = demo()
    d["base"]["model"] = "smollm2-135m-instruc"
    [p] = problems(d)
    assert "did you mean 'smollm2-135m-instruct'" in p


def test_several_problems_reported_at_once():
    d = demo()
    d["bench"]["repaets"] = 3
    d["exports"][0]["format"] = "ggml"
    d["objectives"] = {"perplexity": "lowest"}
    ps = problems(d)
    assert len(ps) == 3
    assert any(p.startswith("exports[0].format:") and "did you mean 'gguf'" in p for p in ps)
    assert any(p.startswith("objectives.perplexity:") and "allowed: min, max" in p for p in ps)


def test_impossible_pipeline_drops_every_layer():
    d = demo()
    d["pipelines"][1][0]["drop"] = [2, 30]
    [p] = problems(d)
    assert p.startswith("pipelines[1][0].drop:") and "30" in p


def test_out_of_range_and_empty_grid():
    d = demo()
    d["data"]["eval_windows"] = 0
    d["exports"] = []
    ps = problems(d)
    assert any(p.startswith("data.eval_windows:") for p in ps)
    assert any(p.startswith("exports:") for p in ps)


def test_file_errors():
    with pytest.raises(SpecError, match="does not exist"):
        spec.load("jobs/no-such-file.yaml")


def test_schema_file_is_current():
    committed = json.loads((ROOT / "jobs" / "sweep.schema.json").read_text())
    assert committed == spec.json_schema(), "run `make schema` to regenerate jobs/sweep.schema.json"


# ---- ONNX / OpenVINO export options: exports[1] is onnx, exports[2] onnx (genai builder), exports[3] openvino in the demo sweep
def test_level_of_another_format_is_refused():
    d = demo()
    d["exports"][1]["quant"] = ["fp32", "int4_asym"]
    [p] = problems(d)
    assert p.startswith("exports[1].quant:") and "'int4_asym' is not a level of format 'onnx'" in p


def test_group_size_the_model_does_not_divide():
    d = demo()
    d["exports"][3]["group_size"] = 128
    [p] = problems(d)
    assert p.startswith("exports[3].group_size:") and "hidden_size 576" in p and "[16, 32, 64]" in p


def test_group_size_must_be_a_power_of_two():
    d = demo()
    d["exports"][1]["group_size"] = 48
    [p] = problems(d)
    assert p.startswith("exports[1].group_size:") and "power of two" in p


def test_data_aware_algorithm_without_enough_calibration_text():
    d = demo()
    d["data"]["calib_tokens"] = 1024  # awq_se reads 16 x 256 tokens by default
    [p] = [p for p in problems(d) if p.startswith("exports")]  # (the demo's prune_layers wants 8 x 256 too)
    assert p.startswith("exports[3].calib_samples:") and "awq_se" in p and "data.calib_tokens" in p


def test_algorithm_of_another_format_or_level():
    d = demo()
    d["exports"][1]["algorithm"] = "awq"
    [p] = problems(d)
    assert p.startswith("exports[1].algorithm:") and "'awq' is not an algorithm of format 'onnx'" in p
    d = demo()
    d["exports"][3]["quant"] = ["fp32", "int8"]
    [p] = problems(d)
    assert p.startswith("exports[3].algorithm:") and "int4 levels only" in p
    d = demo()
    d["exports"][0]["algorithm"] = "gptq"
    [p] = problems(d)
    assert p.startswith("exports[0].algorithm:") and "unknown key 'algorithm'" in p  # gguf has none


def test_onnx_packed_algorithms_need_an_even_number_of_groups():
    d = demo()
    d["exports"][1].update(algorithm=["rtn", "k_quant"], group_size=64)  # 576 / 64 = 9 groups
    [p] = problems(d)
    assert p.startswith("exports[1].group_size:") and "use 32" in p
    d["exports"][1]["group_size"] = 32
    assert spec.parse(d)


def test_variants_hold_only_what_each_level_reads():
    from farm.export import FORMATS

    e = FORMATS.options("openvino")(format="openvino", quant=["fp16", "int4_sym"], algorithm=["rtn", "gptq"],
                                    ratio=0.8)
    assert [v.params for v in e.variants()] == [
        {"format": "openvino", "quant": "fp16"},
        {"format": "openvino", "quant": "int4_sym", "group_size": 64, "algorithm": "rtn", "ratio": 0.8},
        {"format": "openvino", "quant": "int4_sym", "group_size": 64, "algorithm": "gptq", "calib_samples": 16,
         "calib_seq_len": 256, "ratio": 0.8},
    ]


def test_student_larger_than_the_model_entering_the_step():
    d = demo()
    d["pipelines"] = [[{"method": "prune_layers", "drop": 4}, {"method": "distill", "student_layers": 26}]]
    [p] = problems(d)
    assert p.startswith("pipelines[0][1].student_layers:") and "26 blocks" in p


def test_lora_rank_must_be_positive_and_targets_known():
    d = demo()
    d["pipelines"] = [[{"method": "lora", "rank": [8, 0], "targets": ["q_proj", "qkv"]}]]
    ps = problems(d)
    assert any(p.startswith("pipelines[0][0].rank:") for p in ps)
    assert any(p.startswith("pipelines[0][0].targets[1]:") and "'qkv'" in p for p in ps), ps


def test_only_grid_fields_expand():
    from farm.plan import grid

    d = demo()
    d["pipelines"] = [[{"method": "lora", "rank": [4, 8], "targets": ["q_proj", "v_proj"]}]]
    d["exports"] = [{"format": "gguf", "quant": "F16"}]
    g = grid.build(spec.parse(d))
    assert len(g.cells) == 2 + 1  # two ranks (targets is a plain list) + the baseline
    lora = [s for s in g.stages.values() if s.kind == "compress"]
    assert len(lora) == 2 and all(len(s.deps) == 3 for s in lora)  # model, reference, base (the teacher)


def test_gqa_and_sparsity_bounds():
    d = demo()
    d["pipelines"] = [[{"method": "gqa", "kv_heads": 2}], [{"method": "sparsify", "sparsity": 1.0}],
                      [{"method": "sparsify", "sparsity": 0.3, "pattern": "2:4"}]]
    ps = problems(d)
    assert any(p.startswith("pipelines[0][0].kv_heads:") and "3 KV heads" in p for p in ps), ps
    assert any(p.startswith("pipelines[1][0].sparsity:") and "between 0 and 1" in p for p in ps), ps
    assert any(p.startswith("pipelines[2][0].sparsity:") and "2:4" in p for p in ps), ps


def test_a_method_refuses_an_architecture_it_cannot_handle_at_validation(tmp_path):
    """Found by a new user's non-Llama checkpoint: smoothquant/awq failed inside their Ray tasks."""
    model = tmp_path / "gpt2-like"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "num_hidden_layers": 4, "hidden_size": 64}))
    (model / "model.safetensors").write_bytes(b"")
    (model / "tokenizer.json").write_text("{}")
    d = demo()
    d["base"] = {"model": str(model)}
    d["pipelines"] = [[{"method": "smoothquant"}], [{"method": "awq"}]]
    ps = problems(d)
    assert any(p.startswith("pipelines[0][0].method: smoothquant supports the architectures llama") and "'gpt2'" in p
               for p in ps), ps
    assert any(p.startswith("pipelines[1][0].method: awq supports") for p in ps), ps


def test_a_step_that_would_get_fewer_calibration_samples_than_it_asks_for_is_refused():
    """It used to be given min(calib_samples, tokens // seq_len) samples without a word."""
    d = demo()
    d["data"]["calib_tokens"] = 1024
    d.pop("serve")  # its prompts would not fit either
    d["exports"] = [{"format": "gguf", "quant": "Q8_0"}]
    d["pipelines"] = [[{"method": "prune_layers", "drop": 2}], [{"method": "gptq", "calib_samples": 4, "seq_len": 256}]]
    [p] = problems(d)  # prune_layers: 8 x 256 > 1024; gptq: 4 x 256 = 1024 fits
    assert p.startswith("pipelines[0][0].calib_samples: 8 x seq_len 256 = 2048") and "data.calib_tokens" in p


def test_a_misspelt_metric_a_duplicate_target_and_a_too_deep_prune_are_reported_together():
    """Before: the duplicate target and the prune depth came only after every other error was fixed, and the
    metric's message carried pydantic's '[key]' and the families as regular expressions."""
    with pytest.raises(SpecError) as e:
        spec.parse({"name": "bad", "base": {"model": "smollm2-135m-instruct"},
                    "pipelines": [[{"method": "prune_layers", "drop": 40}]],
                    "exports": [{"format": "gguf", "quant": "Q8_0"}],
                    "targets": [{"name": "a"}, {"name": "a"}],
                    "objectives": {"perplexity": "min", "decode_sped": "max"}})
    problems = e.value.problems
    assert len(problems) == 3, problems
    assert any(p.startswith("targets: target names must be unique, repeated: a") for p in problems)
    assert any("drop: [40] would leave no decoder block" in p for p in problems)
    [metric] = [p for p in problems if "decode_sped" in p]
    assert metric.startswith("objectives.decode_sped: unknown metric 'decode_sped' — did you mean 'decode_tok_s'?")
    assert "serve_[prefix_]output_tok_s_c<N>" in metric and not any(c in metric for c in ("^", "\\", "?:", "[1-9]"))
