"""Data split, storage atomicity, registry."""

import pytest

from farm import storage
from farm.errors import FarmError
from farm.inputs import data
from farm.registry import Registry


def test_embedded_split_is_disjoint_and_stable():
    from pydoc_data.topics import topics

    calib, evals = data.split([])
    assert calib and evals and data.split([]) == (calib, evals)
    for text in topics.values():  # every topic text lands on exactly one side
        if len(text) > 200:
            assert (text in evals) == data.is_eval(text)
            assert (text in calib) != data.is_eval(text)


def test_user_files_split_by_paragraph(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"paragraph number {i} " * 5 for i in range(40)))
    calib, evals = data.split([str(f)])
    assert set(calib.split("\n\n")).isdisjoint(evals.split("\n\n"))
    with pytest.raises(FarmError, match="calib_tokens"):
        data.take_tokens([1, 2, 3], 10, "calibration")


def test_publishing_is_all_or_nothing(tmp_path):
    final = tmp_path / "stage"
    with pytest.raises(RuntimeError), storage.publishing(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed midway")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with storage.publishing(final) as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert (final / "whole.bin").read_bytes() == b"y"


def test_registry_did_you_mean():
    r = Registry("thing", {"prune_layers": "farm.compress.prune_layers"}, base="farm.plugin:StepOptions",
                 key="method", needs=("apply",))
    assert callable(r.get("prune_layers").apply)
    with pytest.raises(FarmError, match="did you mean 'prune_layers'"):
        r.get("prune_layer")


def test_what_a_killed_writer_left_is_removed(tmp_path):
    import socket
    import subprocess

    final = tmp_path / "stage"
    child = subprocess.Popen(["true"])  # a writer that has exited
    child.wait()
    stale = tmp_path / f".stage.tmp-{socket.gethostname()}-{child.pid}-abc"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    with storage.publishing(final) as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert not stale.exists() and (final / "whole.bin").is_file()
