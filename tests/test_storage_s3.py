"""An s3:// store (moto's S3 server on 127.0.0.1): stages on one node publish, a second node with an
empty cache fetches what it needs, checksummed; half-uploaded or damaged stages are never used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from farm import storage
from farm.errors import FarmError
from farm.plan import grid
from farm.stages import runner as stages
from farm.sweep import spec

pytestmark = pytest.mark.slow
DATA = {"files": [], "calib_tokens": 1024, "eval_windows": 2, "eval_window_tokens": 64}


@pytest.fixture
def store(s3_server, tmp_path, monkeypatch, request):
    import fsspec

    bucket = f"farm-{request.node.name.replace('_', '-')[:40].lower()}"
    options = s3_server(bucket)
    monkeypatch.setenv("FARM_STORAGE", f"s3://{bucket}/sweeps")
    monkeypatch.setenv("FARM_STORAGE_OPTIONS", json.dumps(options))
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "node-a"))
    return fsspec.filesystem("s3", **options), f"{bucket}/sweeps"


def _grid(model_dir: Path):
    sweep = spec.parse({"name": "s3", "base": {"model": str(model_dir)}, "data": DATA, "pipelines": [[]],
                        "exports": [{"format": "gguf", "quant": "Q8_0"}],
                        "bench": {"prompt_tokens": 16, "decode_tokens": 8, "warmup": 1, "repeats": 2, "threads": 1}})
    return grid.build(sweep)


def test_second_node_fetches_what_it_needs(store, tiny_model_dir, tmp_path, monkeypatch):
    fs, base = store
    g = _grid(tiny_model_dir)
    export = next(s for s in g.stages.values() if s.kind == "export" and s.params["quant"] == "Q8_0")
    evaluate = next(s for s in g.stages.values() if s.kind == "evaluate" and s.deps[0] == export.id)
    results = {}
    for sid, stage in g.stages.items():  # node A: everything but the evaluation
        if stage.kind != "evaluate":
            results[sid] = stages.run_stage(stage, [results[d] for d in stage.deps])
    # (a benchmark is stored under its machine's name too: bench.reuse same_host)
    assert all(fs.exists(f"{base}/stages/{stages.storage_name(s)}/COMPLETE.json")
               for s in g.stages.values() if s.id in results)
    # the base model travels inside its stage: node B may not have the user's local path
    base_stage = next(s for s in g.stages.values() if s.kind == "base")
    assert fs.exists(f"{base}/stages/{base_stage.name}/COMPLETE.json")
    shutil.rmtree(tmp_path / "node-a")  # node A's cache is gone: only the store holds the stages

    monkeypatch.setenv("FARM_HOME", str(tmp_path / "node-b"))
    deps = [results[d] for d in evaluate.deps]  # their paths point into node A's (deleted) cache
    out = stages.run_stage(evaluate, deps)
    assert out["cached"] is False and out["metrics"]["perplexity"] > 1
    assert (storage.stage_dir(export.name) / "result.json").is_file()  # fetched into node B's cache
    # a third node finds the evaluation finished in the store and does not run it again
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "node-c"))
    again = stages.run_stage(evaluate, deps)
    assert again["cached"] is True and again["metrics"] == out["metrics"]

    # the MLflow tag's URL of an artifact points into the store and resolves on yet another node
    uri = storage.uri_of(stages.local(results[export.id])["artifact"])
    assert uri.startswith(f"s3://{base}/stages/{export.name}/")
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "node-d"))
    path = storage.local_path(uri)
    assert path.is_file() and storage.sha256(path) == results[export.id]["sha256"]
    # the driver's node logs the raw benchmark JSON a bench node wrote
    from farm.stages.bench import raw_json as _bench_json

    bench = next(s for s in g.stages.values() if s.kind == "bench" and s.deps[0] == export.id)
    raw = _bench_json(results[bench.id])
    assert raw is not None and str(raw).startswith(str(storage.root())) and json.loads(raw.read_text())


def test_incomplete_upload_is_invisible_and_damage_is_caught(store, tiny_model_dir, tmp_path, monkeypatch):
    fs, base = store
    g = _grid(tiny_model_dir)
    base_stage = next(s for s in g.stages.values() if s.kind == "base")
    reference = next(s for s in g.stages.values() if s.kind == "reference")
    done = stages.run_stage(base_stage, [])
    stages.run_stage(reference, [done])

    # a writer killed before COMPLETE.json: its payload is there, the stage is not
    fs.pipe_file(f"{base}/stages/half-done/deadbeef/result.json", b"{}")
    assert storage.read_result("half-done") is None

    # a damaged object in the store is refused, and nothing half-fetched stays in the cache
    marker = json.loads(fs.cat_file(f"{base}/stages/{reference.name}/COMPLETE.json"))
    victim = next(k for k in marker["files"] if k.endswith(".npy"))
    fs.pipe_file(f"{base}/stages/{reference.name}/{marker['payload']}/{victim}", b"tampered")
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "node-b"))
    with pytest.raises(FarmError, match="checksum mismatch"):
        storage.read_result(reference.name)
    assert not storage.stage_dir(reference.name).exists()
    assert not list((storage.root() / "stages").glob(".*tmp-*"))

    with pytest.raises(FarmError, match="FARM_STORAGE"):
        storage.local_path("s3://another-bucket/stages/x/y/model.gguf")


def test_a_hostile_manifest_cannot_place_files_outside_the_stage(store, tiny_model_dir, tmp_path, monkeypatch):
    """Someone who can write the bucket rewrites a stage's COMPLETE.json to name '../..' paths (with the right
    checksums, which sit in the same bucket): the fetch is refused before a byte is written."""
    import hashlib

    fs, base = store
    g = _grid(tiny_model_dir)
    base_stage = next(s for s in g.stages.values() if s.kind == "base")
    stages.run_stage(base_stage, [])
    marker = json.loads(fs.cat_file(f"{base}/stages/{base_stage.name}/COMPLETE.json"))
    payload = b"written by the store"
    for rel in ("../../escaped.txt", "/tmp/farm-escaped.txt", "model/../../escaped.txt"):
        fs.pipe_file(f"{base}/stages/{base_stage.name}/{marker['payload']}/{rel.lstrip('/')}", payload)
        hostile = {**marker, "files": {**marker["files"], rel: hashlib.sha256(payload).hexdigest()}}
        fs.pipe_file(f"{base}/stages/{base_stage.name}/COMPLETE.json", json.dumps(hostile).encode())
        monkeypatch.setenv("FARM_HOME", str(tmp_path / f"node-{len(rel)}"))
        with pytest.raises(FarmError, match="is not a path inside the stage"):
            storage.read_result(base_stage.name)
        assert not storage.stage_dir(base_stage.name).exists()
        assert not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/farm-escaped.txt").exists()
    hostile = {**marker, "payload": "../other-stage"}
    fs.pipe_file(f"{base}/stages/{base_stage.name}/COMPLETE.json", json.dumps(hostile).encode())
    with pytest.raises(FarmError, match="not a plain directory name"):
        storage.read_result(base_stage.name)


def test_a_stage_rewritten_in_the_store_is_refused_where_the_driver_pinned_it(store, tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    """Someone who can write the bucket replaces a finished stage whole — a new payload and a manifest whose
    checksums match it, so the bucket's own record is consistent: a node given the driver's result (its
    pins, the manifest digests the driver was told when the stage was produced) refuses it; promote's
    fetch, pinned by the cell's MLflow tag, too."""
    import hashlib

    fs, base = store
    g = _grid(tiny_model_dir)
    base_stage = next(s for s in g.stages.values() if s.kind == "base")
    reference = next(s for s in g.stages.values() if s.kind == "reference")
    done = stages.run_stage(base_stage, [])
    assert done["pins"] == {base_stage.name: storage.manifest_digest(base_stage.name)}
    ref = stages.run_stage(reference, [done])
    assert set(ref["pins"]) == {base_stage.name, reference.name}  # what it read from, and itself

    marker = json.loads(fs.cat_file(f"{base}/stages/{base_stage.name}/COMPLETE.json"))
    config = next(k for k in marker["files"] if k.endswith("config.json"))
    evil = b'{"model_type": "not what was measured"}'
    fs.pipe_file(f"{base}/stages/{base_stage.name}/evil/{config}", evil)
    for rel in marker["files"]:
        if rel != config:
            fs.copy(f"{base}/stages/{base_stage.name}/{marker['payload']}/{rel}",
                    f"{base}/stages/{base_stage.name}/evil/{rel}")
    rewritten = {"payload": "evil", "files": {**marker["files"], config: hashlib.sha256(evil).hexdigest()}}
    fs.pipe_file(f"{base}/stages/{base_stage.name}/COMPLETE.json", json.dumps(rewritten).encode())

    monkeypatch.setenv("FARM_HOME", str(tmp_path / "node-b"))  # a node that never held the stage
    with pytest.raises(FarmError, match="not the manifest the sweep recorded"):
        stages.local(done)
    assert not storage.stage_dir(base_stage.name).exists()
    uri = storage.uri_of(done["model_dir"] + "/config.json")
    with pytest.raises(FarmError, match="not the manifest the sweep recorded"):
        storage.local_path(uri, done["pins"][base_stage.name])
    # unpinned, the store's own record is all there is: it is consistent, so only the pin could tell
    assert json.loads(storage.local_path(uri).read_text())["model_type"] == "not what was measured"


def test_two_writers_finishing_the_same_stage_agree_on_the_first(store, tmp_path, monkeypatch):
    """Issue 35: two sweeps (nodes A and B) finish the same stage at once, each having found no COMPLETE.json.
    The first manifest written stands (a conditional write); B discards its payload and returns A's result, and
    every pin is the manifest the store holds (before: B's manifest replaced A's, and a reader pinned to A's
    result failed with a false 'the store was rewritten')."""
    import os

    import farm.stages.base as base_kind
    from farm.plan.grid import Stage

    fs, base = store
    stage = Stage("0123456789ab", "base", {}, ())

    def run(st, deps, out):
        (out / "by.txt").write_text(os.environ["FARM_HOME"])
        return {"by": os.environ["FARM_HOME"]}

    monkeypatch.setattr(base_kind, "run", run)
    s3, _ = storage._fs()
    real_put, first = s3.put_file, {}

    def put_file(lpath, rpath, **kw):
        if not first:  # B has looked for COMPLETE.json and found none: A finishes the stage now
            first["a"], b_home = None, os.environ["FARM_HOME"]
            os.environ["FARM_HOME"] = str(tmp_path / "node-a")
            first["a"] = stages.run_stage(stage, [])
            os.environ["FARM_HOME"] = b_home
        return real_put(lpath, rpath, **kw)

    monkeypatch.setattr(s3, "put_file", put_file)
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "node-b"))
    b = stages.run_stage(stage, [])
    a = first["a"]
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "node-c"))  # a reader given A's result (its pins)
    assert storage.read_result(stage.name, a["pins"][stage.name])["by"] == str(tmp_path / "node-a")
    assert a["pins"] == b["pins"] == {stage.name: storage.manifest_digest(stage.name)}
    assert b["by"] == a["by"] == str(tmp_path / "node-a") and b["cached"] is True
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "node-b"))  # B's own copy is now A's
    assert (storage.stage_dir(stage.name) / "by.txt").read_text() == str(tmp_path / "node-a")
    marker = json.loads(fs.cat_file(f"{base}/stages/{stage.name}/COMPLETE.json"))
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{base}/stages/{stage.name}", refresh=True)) == \
        sorted(["COMPLETE.json", marker["payload"]])  # B's payload is gone


def test_an_upload_does_not_follow_a_symlink_out_of_the_stage(store, tmp_path):
    """Issue 35: a stage directory holding a link to a file outside it (made before links were refused when
    publishing) is not uploaded: the link is named, and nothing reaches the bucket."""
    fs, base = store
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    name = "base-0123456789ab"
    local = storage.stage_dir(name)
    local.mkdir(parents=True)
    (local / "result.json").write_text(json.dumps({"stage": name, "kind": "base"}))
    (local / "leak.txt").symlink_to(secret)
    with pytest.raises(FarmError, match="leak.txt"):
        storage.upload(name)
    assert not fs.exists(f"{base}/stages/{name}")
