"""Stale results are never reused (issue 35): a stage id holds what its inputs hold, not only their names."""

import shutil

import pytest

from farm.errors import ModelError
from farm.inputs import modelref
from farm.plan import grid
from farm.stages import runner
from farm.sweep import spec

DATA = {"files": [], "calib_tokens": 256, "eval_windows": 1, "eval_window_tokens": 32}


def _sweep(model: str, **base) -> spec.Sweep:
    return spec.parse({"name": "stale", "base": {"model": model, **base}, "data": DATA,
                       "exports": [{"format": "gguf", "quant": "F16"}]})


def _base_id(model: str, **base) -> str:
    g = grid.build(_sweep(model, **base))
    [sid] = [s for s, st in g.stages.items() if st.kind == "base"]
    return sid


def test_a_model_overwritten_in_place_gets_new_stage_ids(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = _base_id(str(model))
    assert _base_id(str(model)) == before  # the same files: the same id, so results are reused
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8) if data[-8:] != bytes(8) else b"\x01" * 8  # other weights, same size
    weights.write_bytes(bytes(data))
    assert _base_id(str(model)) != before


def test_a_large_weight_file_is_sampled_and_still_changes_its_digest(tmp_path, monkeypatch):
    monkeypatch.setattr(modelref, "LARGE", 1 << 20)
    f = tmp_path / "w.safetensors"
    f.write_bytes(bytes(4 << 20))
    st = f.stat()
    before = modelref._file_digest(f)
    with open(f, "r+b") as h:  # new weights in the middle of the file, size and mtime kept
        h.seek(2 << 20)
        h.write(b"\x07" * (1 << 20))
    import os
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert modelref._file_digest(f) != before


def test_the_base_stage_refuses_a_model_changed_after_submission(tiny_model_dir, tmp_path, storage_root):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    g = grid.build(_sweep(str(model)))
    [stage] = [st for st in g.stages.values() if st.kind == "base"]
    (model / "config.json").write_text((model / "config.json").read_text().replace("{", '{"edited": 1, ', 1))
    with pytest.raises(ModelError, match="changed after the sweep was submitted"):
        runner.run_stage(stage, [])


def test_a_hub_id_is_pinned_to_the_commit_its_revision_names(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    refs = cache / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    first = _base_id("org/model")
    (refs / "main").write_text("b" * 40)  # the hub's main moved on
    assert _base_id("org/model") != first
    assert _base_id("org/model", revision="c" * 40) == _base_id("org/model", revision="c" * 40)
    (refs / "main").unlink()
    with pytest.raises(ModelError, match="could not be pinned to a commit"):
        _base_id("org/model")


def test_serve_benchmarks_honour_the_bench_reuse_policy(tiny_model_dir):
    def serve_stage(reuse: str):
        sweep = spec.parse({"name": "stale", "base": {"model": str(tiny_model_dir)}, "data": DATA,
                            "exports": [{"format": "gguf", "quant": "F16"}], "bench": {"reuse": reuse},
                            "serve": {"cells": "all", "concurrency": [1], "prompt_tokens": 16,
                                      "shared_prefix_tokens": 0, "output_tokens": 4}})
        [stage] = [st for st in grid.build(sweep).stages.values() if st.kind == "serve"]
        return stage

    same_host = serve_stage("same_host")
    assert runner.storage_name(same_host) != same_host.name  # carries the machine
    assert runner.storage_name(same_host).startswith(same_host.name + "@")
    never = serve_stage("never")
    assert runner.storage_name(never, "job-1") != runner.storage_name(never, "job-2")
    assert runner.storage_name(serve_stage("always")) == serve_stage("always").name


def test_a_disturbed_benchmark_is_measured_again_by_the_next_job_not_reused(storage_root, monkeypatch):
    from farm.plan.grid import Stage
    from farm.stages import bench

    runs = []

    def measure(stage, deps, out):
        runs.append(stage.name)
        return {"metrics": {"decode_tok_s": 10.0}, "contaminated": len(runs) == 1}  # the first one disturbed

    monkeypatch.setattr(bench, "run", measure)
    stage = Stage("bench-0123456789ab", "bench", {"bench": {"reuse": "always"}, "nonce": str(storage_root)}, ())
    first = runner.run_stage(stage, [], {"job_id": "job-1"})
    assert first["contaminated"] and not first["cached"]
    assert runner.run_stage(stage, [], {"job_id": "job-1"})["cached"]  # its own job: never measured twice
    second = runner.run_stage(stage, [], {"job_id": "job-2"})
    assert not second["cached"] and not second["contaminated"] and len(runs) == 2
    third = runner.run_stage(stage, [], {"job_id": "job-3"})  # a clean figure stands
    assert third["cached"] and len(runs) == 2
