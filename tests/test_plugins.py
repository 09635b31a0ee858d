"""A plug-in costs one module + one registry line + one test. Test-only dummies (tests/plugins/) — a method,
a format whose default runtime is a new runtime, and that runtime serving the torch format too — go through
validation, the grid, every stage (evaluate and bench in their own processes), MLflow and the Pareto report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from farm.compress import METHODS
from farm.decide import report
from farm.errors import FarmError, SpecError
from farm.export import FORMATS
from farm.plan import grid
from farm.record import cells, outbox
from farm.runtimes import RUNTIMES
from farm.stages import runner as stages
from farm.sweep import spec

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = {METHODS: ("dummy_shrink", "tests.plugins.dummy_method"), FORMATS: ("dummy", "tests.plugins.dummy_format"),
           RUNTIMES: ("dummy_rt", "tests.plugins.dummy_runtime")}


@pytest.fixture
def dummies(monkeypatch):
    """The registry lines, in this process and (FARM_PLUGINS) in the evaluate/bench children."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    kinds = {METHODS: "method", FORMATS: "format", RUNTIMES: "runtime"}
    monkeypatch.setenv("FARM_PLUGINS", " ".join(f"{kinds[r]}:{n}={m}" for r, (n, m) in PLUGINS.items()))
    for registry, (name, module) in PLUGINS.items():
        registry.add(name, module)
    yield
    for registry, (name, _) in PLUGINS.items():
        registry.remove(name)


def sweep_data(tiny_model_dir) -> dict:
    return {
        "name": "dummies", "base": {"model": str(tiny_model_dir)},
        "data": {"calib_tokens": 512, "eval_windows": 1, "eval_window_tokens": 32},
        "pipelines": [[{"method": "dummy_shrink", "shrink": 0.5}]],
        "exports": [{"format": "dummy", "quant": ["fp32", "fp16"]},
                    {"format": "torch", "quant": "fp32", "runtime": ["torch", {"name": "dummy_rt", "scale": 2.0}]}],
        "bench": {"prompt_tokens": 16, "decode_tokens": 4, "warmup": 0, "repeats": 1, "threads": 1},
        "objectives": {"kl_div": "min", "size_mb": "min"},
    }


def test_the_dummies_validate_and_say_what_is_wrong(dummies, tiny_model_dir):
    d = sweep_data(tiny_model_dir)
    d["pipelines"][0][0]["shrink"] = 1.5
    d["exports"][0]["quant"] = ["fp32", "int3"]
    d["exports"][1]["runtime"] = ["torch", {"name": "dummy_rt", "scal": 2}]
    with pytest.raises(SpecError) as e:
        spec.parse(d)
    text = "\n".join(e.value.problems)
    assert "pipelines[0][0].shrink: " in text and "fraction" in text
    assert "exports[0].quant: 'int3' is not a level of format 'dummy'" in text
    assert "exports[1].runtime: dummy_rt: scal: Extra inputs" in text
    d = sweep_data(tiny_model_dir)
    d["exports"][0]["runtime"] = "llamacpp"  # a runtime that cannot load the format
    with pytest.raises(SpecError, match="'llamacpp' is not a runtime of format 'dummy'"):
        spec.parse(d)


@pytest.mark.slow  # every stage, evaluate and bench in child processes, MLflow: ~80 s on 2 cores
def test_the_dummies_run_through_grid_stages_tracking_and_pareto(dummies, tiny_model_dir, storage_root, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    sweep = spec.parse(sweep_data(tiny_model_dir))
    g = grid.build(sweep)
    # the shrunk model x (2 dummy levels + torch fp32 measured by torch and by dummy_rt) + the baseline
    assert len(g.cells) == 2 + 2 + 1 and sum(c.baseline for c in g.cells) == 1
    [fp32] = [s for s in g.stages.values() if s.kind == "export" and s.params == {"format": "dummy", "quant": "fp32"}]
    [fp16] = [s for s in g.stages.values() if s.kind == "export" and s.params == {"format": "dummy", "quant": "fp16"}]
    assert fp16.deps == (fp32.id,)  # made from the format's BASE_LEVEL export, which is shared

    results = {}
    for sid, stage in g.stages.items():
        results[sid] = stages.run_stage(stage, [results[d] for d in stage.deps])
    log = outbox.SweepLog(sweep, g, yaml.safe_dump(sweep_data(tiny_model_dir)))
    for c in g.cells:
        log.log_cell(c, results[c.export], {k: results[s] for k, s in c.stages.items()})
    log.finish(0)

    kl = {cells.cell_label(c): results[c.stages.get("evaluate")]["metrics"]["kl_div"] for c in g.cells}
    shrunk = "dummy_shrink-s0.5"
    noise = abs(kl["base/torch-fp32@any"])  # the baseline against itself: the fp16-stored reference's resolution
    assert noise < 1e-5 and kl[f"{shrunk}/torch-fp32@any"] > 10 * noise  # the method changed the model
    assert abs(kl[f"{shrunk}/dummy-fp32@any"] - kl[f"{shrunk}/torch-fp32@any"]) < 1e-6  # same weights, new runtime
    assert abs(kl[f"{shrunk}/dummy-fp16@any"] - kl[f"{shrunk}/dummy-fp32@any"]) < 1e-4  # fp16 rounding
    assert kl[f"{shrunk}/torch-fp32-dummy_rt-x2.0@any"] > kl[f"{shrunk}/torch-fp32@any"] + 1e-3  # option arrived
    by_label = {cells.cell_label(c): c for c in g.cells}
    assert results[by_label[f"{shrunk}/torch-fp32-dummy_rt-x2.0@any"].stages["bench"]]["runtime_settings"] == \
        {"runtime": "dummy", "scale": 2.0}

    rep = report.pareto_report("dummies")
    assert len(rep["rows"]) == len(g.cells) and rep["best"] is not None
    labels = {r["label"] for r in rep["rows"]}
    assert labels == set(kl)
    # the sweep report: one page with its figures inline and every cell, logged to the parent run
    out = report.build("dummies", tmp_path / "report")
    page = out["html"].read_text()
    assert page.count("data:image/png;base64,") >= 2 and all(label in page for label in labels)
    assert {"report.html", "report.md", "pareto.png"} <= {a.path for a in outbox.client().list_artifacts(out["parent"])}
    assert "dummies" in outbox.client().get_experiment_by_name("dummies").tags["mlflow.note.content"]
    run = outbox.client().get_run(rep["best"]["id"])
    assert json.loads(run.data.tags["farm.artifact_runtime"])["name"] in ("dummy_rt", "torch")

    # every artifact is checksummed when exported, the torch baseline's checkpoint too; promote refuses one
    # whose run records no checksum (it would register what it cannot show was measured)
    baseline = next(c for c in g.cells if c.baseline)
    assert len(results[baseline.export]["sha256"]) == 64
    from farm.decide import promote

    c = outbox.client()
    best = c.get_run(rep["best"]["id"])
    uris = {c.get_run(r["id"]).data.tags["farm.artifact_uri"] for r in rep["rows"]}
    elsewhere = next(u for u in sorted(uris) if u != best.data.tags["farm.artifact_uri"])
    c.set_tag(best.info.run_id, "farm.artifact_uri", elsewhere)
    with pytest.raises(FarmError, match="do not match what its export stage"):  # a tag pointed elsewhere
        promote.promote("dummies", run_id=best.info.run_id)
    c.set_tag(best.info.run_id, "farm.artifact_uri", best.data.tags["farm.artifact_uri"])
    c.set_tag(best.info.run_id, "farm.artifact_sha256", "")
    with pytest.raises(FarmError, match="do not match what its export stage"):
        promote.promote("dummies", run_id=best.info.run_id)


def test_a_registry_refuses_twins_and_modules_that_are_not_plug_ins(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    with pytest.raises(FarmError, match="registered twice"):
        METHODS.add("gptq", "tests.plugins.dummy_method")
    METHODS.add("not_a_method", "tests.plugins.not_a_method")
    try:
        with pytest.raises(FarmError, match="lacks Options .a subclass of StepOptions., apply"):
            METHODS.get("not_a_method")
    finally:
        METHODS.remove("not_a_method")
    METHODS.add("wrong_name", "tests.plugins.dummy_method")
    try:
        with pytest.raises(FarmError, match=r"Options.method must be Literal\['wrong_name'\]"):
            METHODS.get("wrong_name")
    finally:
        METHODS.remove("wrong_name")
