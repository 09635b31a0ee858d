"""What an audit found (issue 17), each checked where it was found."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

from farm import bench, grid, spec, tracking

ROOT = Path(__file__).resolve().parents[1]


def test_the_ray_token_never_appears_on_a_command_line(tmp_path):
    """clusters/local/up.sh polls the dashboard with the token; `ps` shows every command's arguments."""
    fn = subprocess.run(["sed", "-n", "/^up() {/,/^}/p", str(ROOT / "clusters/local/up.sh")], capture_output=True,
                        text=True, check=True).stdout
    assert fn.startswith("up() {")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "curl").write_text('#!/bin/bash\necho "$@" > "$ARGS_OUT"\ncat > "$STDIN_OUT"\n')
    (fake / "curl").chmod(0o755)
    token = tmp_path / "auth_token"
    token.write_text("s3cr3t-token-value")
    script = f"{fn}\nup http://127.0.0.1:9/health\n"
    env = {"PATH": f"{fake}:/usr/bin:/bin", "RAY_AUTH_TOKEN_PATH": str(token), "HOME": str(tmp_path),
           "ARGS_OUT": str(tmp_path / "args"), "STDIN_OUT": str(tmp_path / "stdin")}
    subprocess.run(["bash", "-c", script], env=env, check=True)
    assert "s3cr3t" not in (tmp_path / "args").read_text()
    assert "Bearer s3cr3t-token-value" in (tmp_path / "stdin").read_text()  # it still reaches curl


def test_a_cell_whose_raw_bench_json_is_gone_is_flagged(tmp_path):
    d = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    g = grid.build(spec.parse(copy.deepcopy(d)))
    cell = g.cells[0]
    result = {"metrics": {"decode_tok_s": 1.0}, "bench_json": str(tmp_path / "gone" / "bench.json"), "threads": 2}
    record = tracking.cell_record("0", "parent", cell, {"artifact": str(tmp_path), "format": "torch"}, None, result, None, None)
    assert record["tags"]["farm.bench.raw_missing"] == "true" and "bench.json" not in record["files"]
    (tmp_path / "bench.json").write_text("{}")
    record = tracking.cell_record("0", "parent", cell, {"artifact": str(tmp_path), "format": "torch"}, None,
                                  {**result, "bench_json": str(tmp_path / "bench.json")}, None, None)
    assert "farm.bench.raw_missing" not in record["tags"] and record["files"]["bench.json"] == "{}"


def test_peak_memory_comes_from_this_process_or_not_at_all(tmp_path, monkeypatch):
    assert bench.peak_rss_mb() > 1  # VmHWM of this process
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmRSS:\t1000 kB\n")
    monkeypatch.setattr(bench, "STATUS", str(status))
    with pytest.raises(RuntimeError, match="no VmHWM"):  # not ru_maxrss: that is the forking Ray worker's
        bench.peak_rss_mb()


def test_the_llama_cpp_sdist_whose_code_runs_must_be_the_pinned_one(tmp_path):
    from farm.errors import ToolError
    from farm.export.gguf_export import SDIST_HASHES, check_sdist, llama_cpp_version

    name = f"llama_cpp_python-{llama_cpp_version()}.tar.gz"
    assert name in SDIST_HASHES.read_text()  # the installed version is pinned
    fake = tmp_path / name
    fake.write_bytes(b"not the release")
    with pytest.raises(ToolError, match="is not the pinned"):
        check_sdist(fake)
    other = tmp_path / "llama_cpp_python-0.0.1.tar.gz"
    other.write_bytes(b"")
    with pytest.raises(ToolError, match="has no pinned sha256"):
        check_sdist(other)
