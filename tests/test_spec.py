import json
from pathlib import Path

import pytest
import yaml

from farm import spec
from farm.errors import SpecError

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
    assert "did you mean 'prune_layers'" in p and "allowed: none, prune_layers" in p


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
