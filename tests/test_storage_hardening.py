"""Issue 35, the shared store: a publish race ends with one result that caller and store agree on, a stage is
on disk (fsync) before it is published and a torn result.json is rebuilt, and a symbolic link never carries
what it points at into the store."""

from __future__ import annotations

import json
import os

import pytest

import farm.stages.base as base_kind
from farm import storage
from farm.errors import FarmError
from farm.plan.grid import Stage
from farm.stages import runner

STAGE = Stage("0123456789ab", "base", {}, ())


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FARM_STORAGE", str(tmp_path / "store"))
    monkeypatch.delenv("FARM_STORAGE_OPTIONS", raising=False)
    return tmp_path / "store"


def test_the_loser_of_a_local_publish_race_returns_the_winners_result(store, monkeypatch):
    """Two sweeps finish the same stage at once: the second to publish gets the first's result (which storage
    holds), not its own (before: it returned its own while storage held the winner's files)."""
    def run(stage, deps, out):
        with storage.publishing(storage.stage_dir(STAGE.name)) as theirs:  # another sweep finishes meanwhile
            (theirs / "result.json").write_text(json.dumps({"stage": STAGE.name, "kind": "base", "by": "winner"}))
        (out / "mine.txt").write_text("the loser's")
        return {"by": "loser"}

    monkeypatch.setattr(base_kind, "run", run)
    out = runner.run_stage(STAGE, [])
    held = json.loads((storage.stage_dir(STAGE.name) / "result.json").read_text())
    assert held["by"] == "winner" and out["by"] == "winner" and out["cached"] is True
    assert not (storage.stage_dir(STAGE.name) / "mine.txt").exists()
    assert not list((store / "stages").glob(".*tmp-*"))  # the loser's output is gone


def test_a_stage_is_fsynced_before_it_is_published(store, monkeypatch):
    """Its files and directories reach the disk before the rename that publishes them, and the rename itself after
    (before: no fsync at all, so a crash could leave a published stage of empty or short files)."""
    events = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def recording(real):
        def rename(a, b):
            events.append(("rename", str(a), str(b)))
            real(a, b)
        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", recording(os.replace))
    monkeypatch.setattr(os, "rename", recording(os.rename))
    final = store / "stages" / "x"
    with storage.publishing(final) as tmp:
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_bytes(b"w" * 100)
        (tmp / "result.json").write_text("{}")
    [published] = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final)]
    synced_before = {e[1] for e in events[:published] if e[0] == "fsync"}
    assert {f"{tmp}/model/weights.bin", f"{tmp}/result.json", f"{tmp}/model", str(tmp)} <= synced_before
    assert ("fsync", str(final.parent)) in events[published:]


def test_a_torn_result_json_is_rebuilt_not_a_permanent_failure(store, monkeypatch, capsys):
    """A result.json cut short (a crash, a full disk) or not naming its stage is treated as absent: said, set
    aside and the stage run again (before: json.loads raised on every later run, the stage failed for good)."""
    runs = []

    def run(stage, deps, out):
        runs.append(1)
        return {"n": len(runs)}

    monkeypatch.setattr(base_kind, "run", run)
    f = storage.stage_dir(STAGE.name) / "result.json"
    assert runner.run_stage(STAGE, [])["n"] == 1
    for n, torn in ((2, f.read_text()[:20]), (3, "{}"), (4, "[1, 2]")):
        f.write_text(torn)
        again = runner.run_stage(STAGE, [])
        assert again["cached"] is False and again["n"] == n and json.loads(f.read_text())["n"] == n
        assert f"{f} " in capsys.readouterr().out  # said, naming the file
    (f.parent / "result.json").unlink()  # a stage directory without its result.json
    assert runner.run_stage(STAGE, [])["n"] == 5
    assert runner.run_stage(STAGE, [])["cached"] is True
    assert not list((store / "stages").glob(".*tmp-*"))


def test_a_symlink_out_of_a_stage_is_refused_naming_the_file(store, tmp_path):
    """A stage's output holding a link to a file outside it would publish that file into the shared store (an
    upload follows it): refused, naming the link. A link inside the stage is published (an upload copies its
    content)."""
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    final = store / "stages" / "x"
    for target in (secret, "../../../secret.txt"):
        with pytest.raises(FarmError, match="model/leak.txt"), storage.publishing(final) as tmp:
            (tmp / "model").mkdir()
            (tmp / "model" / "leak.txt").symlink_to(target)
        assert not final.exists() and not list(final.parent.glob(".*tmp-*"))
    with storage.publishing(final) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "b.txt").symlink_to("a.txt")
    assert (final / "b.txt").read_text() == "a"


def test_a_model_directory_is_copied_into_storage_without_following_links_out_of_it(tmp_path):
    """storage.copy_tree, for a model directory copied into a stage: a link out of the directory is refused,
    naming it; one inside it is copied as its content; a Hugging Face cache snapshot's links into its blobs are
    the model's own files."""
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "tokenizer.json").symlink_to("../config.json")
    storage.copy_tree(src, tmp_path / "copy")
    copied = tmp_path / "copy" / "sub" / "tokenizer.json"
    assert copied.read_text() == "{}" and not copied.is_symlink()
    (tmp_path / "secret.txt").write_text("s3cr3t")
    (src / "weights.safetensors").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(FarmError, match="weights.safetensors"):
        storage.copy_tree(src, tmp_path / "copy2")
    assert not (tmp_path / "copy2").exists()
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("weights")
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    (repo / "snapshots" / "c0ffee" / "model.safetensors").symlink_to("../../blobs/abc")
    storage.copy_tree(repo / "snapshots" / "c0ffee", tmp_path / "copy3")
    assert (tmp_path / "copy3" / "model.safetensors").read_text() == "weights"
