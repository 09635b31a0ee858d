"""What an audit found (issue 17), each checked where it was found."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

from farm.measure import speed as bench
from farm.plan import grid
from farm.record import cells
from farm.sweep import spec

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
    record = cells.cell_record("0", "parent", cell, {"artifact": str(tmp_path), "format": "torch"}, {"bench": result},
                               None, None)
    assert record["tags"]["farm.bench.raw_missing"] == "true" and "bench.json" not in record["files"]
    (tmp_path / "bench.json").write_text("{}")
    record = cells.cell_record("0", "parent", cell, {"artifact": str(tmp_path), "format": "torch"},
                               {"bench": {**result, "bench_json": str(tmp_path / "bench.json")}}, None, None)
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


def _requirements(lock: Path) -> dict[str, list[str]]:
    """name==version -> its --hash values, from a pip requirements file with continuation lines."""
    out = {}
    for line in lock.read_text().replace("\\\n", " ").splitlines():
        if line.strip() and not line.startswith("#"):
            req, *hashes = line.split("--hash=")
            out[req.strip()] = [h.strip() for h in hashes]
    return out


def test_every_file_setup_installs_from_an_index_is_hash_checked():
    """The lock and the first-installed pins name a sha256 for every release, and the Makefile installs them
    with --require-hashes: a file on the index that is not the one locked is refused by pip."""
    for lock, least in (("requirements.lock", 100), ("requirements.first.lock", 2), ("requirements.nodeps.lock", 1)):
        reqs = _requirements(ROOT / lock)
        assert len(reqs) >= least
        for req, hashes in reqs.items():
            assert "==" in req and hashes and all(h.startswith("sha256:") and len(h) == 71 for h in hashes), (lock, req)
    assert "torch==2.13.0+cpu" in _requirements(ROOT / "requirements.first.lock")  # never PyPI's CUDA build
    recipe = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), ".venv/.farm-setup"], capture_output=True,
                            text=True, check=True).stdout
    installs = [line for line in recipe.splitlines() if " install " in line and "pip" in line
                and not line.endswith("-e .")]  # farm itself: this clone
    assert len(installs) == 3 and all("--require-hashes" in line for line in installs), installs


def test_lock_hashes_takes_only_the_pinned_releases_files(tmp_path):
    """scripts/lock-hashes.py against a local index and a find-links folder (no network: --index only
    for the local ones; PyPI answers nothing for a name it does not hold)."""
    import hashlib
    import sys

    index = tmp_path / "simple" / "farm-no-such-pkg-0x1"
    index.mkdir(parents=True)
    a, b = "a" * 64, "b" * 64
    (index / "index.html").write_text(
        f'<a href="../../files/farm_no_such_pkg_0x1-1.0-py3-none-any.whl#sha256={a}">x</a>'
        f'<a href="../../files/farm_no_such_pkg_0x1-2.0-py3-none-any.whl#sha256={b}">y</a>')
    links = tmp_path / "wheels"
    links.mkdir()
    (links / "farm_no_such_pkg_0x1-1.0+cpu-py3-none-any.whl").write_bytes(b"cpu build")
    lock = tmp_path / "r.lock"
    lock.write_text("farm-no-such-pkg-0x1==1.0\nfarm-no-such-pkg-0x1==1.0+cpu\n")
    cmd = [sys.executable, str(ROOT / "scripts" / "lock-hashes.py"), str(lock),
           "--index", f"file://{tmp_path / 'simple'}", "--index", str(links), "--offline"]
    subprocess.run(cmd, check=True)
    reqs = _requirements(lock)
    assert reqs == {"farm-no-such-pkg-0x1==1.0": [f"sha256:{a}"],
                    "farm-no-such-pkg-0x1==1.0+cpu": [f"sha256:{hashlib.sha256(b'cpu build').hexdigest()}"]}
    lock.write_text("farm-no-such-pkg-0x1==3.0\n")  # a release no index holds: refused, file untouched
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 1 and "no published file found for: farm-no-such-pkg-0x1==3.0" in res.stderr
    assert lock.read_text() == "farm-no-such-pkg-0x1==3.0\n"


# ---- issue 35: a few doors


def _agreement():
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("agreement", ROOT / "benchmarks" / "agreement.py")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module


def test_agreement_benchmarks_with_the_sweeps_own_reference_stage(tmp_path, monkeypatch):
    """`benchmarks/agreement.py --sweep NAME` took whichever reference-* stage the store listed last: with a second
    model swept into the same store, another model's prompt tokens. It takes the one the sweep's recorded grid
    names, and refuses when the store lacks it."""
    import json
    from types import SimpleNamespace

    from farm.record import queries

    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    monkeypatch.delenv("FARM_STORAGE", raising=False)
    stages_dir = tmp_path / "storage" / "stages"
    own, other = "reference-aaaaaaaaaaaa", "reference-bbbbbbbbbbbb"
    recorded = {"stages": [{"id": "111111111111", "kind": "base", "params": {}, "deps": []},
                           {"id": "aaaaaaaaaaaa", "kind": "reference", "params": {}, "deps": ["111111111111"]}],
                "cells": []}

    class Client:
        def download_artifacts(self, run_id, path, dst):
            (Path(dst) / path).write_text(json.dumps(recorded if path == "grid.json" else {}))
            return str(Path(dst) / path)

    parent = SimpleNamespace(info=SimpleNamespace(run_id="p", experiment_id="0"))
    monkeypatch.setattr(queries, "latest_sweep_run", lambda name, run_id=None: (Client(), None, parent))
    monkeypatch.setattr(queries, "sweep_spec", lambda c, p: {"bench": {"prompt_tokens": 16}})
    monkeypatch.setattr(queries, "cell_runs", lambda p: [])

    def stage(name):
        (stages_dir / name).mkdir(parents=True)
        (stages_dir / name / "result.json").write_text(json.dumps({"stage": name, "kind": "reference",
                                                                   "reference_dir": "."}))
    agreement = _agreement()
    stage(other)  # another model's sweep in the same store
    with pytest.raises(SystemExit, match=own):
        agreement.sweep_cells("demo")
    stage(own)
    _, reference, _ = agreement.sweep_cells("demo")
    assert reference.resolve() == (stages_dir / own).resolve()


def test_promote_refuses_an_export_stage_tag_that_is_not_a_stage_name(tmp_path, monkeypatch):
    """The run's farm.export_stage tag (editable by anyone who can edit tags) was joined into a storage path
    unchecked: '../../x' read a result.json from outside the store."""
    import json
    from types import SimpleNamespace

    from farm.decide import promote
    from farm.errors import FarmError

    monkeypatch.setenv("FARM_STORAGE", str(tmp_path / "store"))
    (tmp_path / "store" / "stages").mkdir(parents=True)
    for name, where in (("../../outside", tmp_path / "outside"), ("export-0123456789ab", None)):
        d = where or tmp_path / "store" / "stages" / name
        d.mkdir()
        (d / "result.json").write_text(json.dumps({"stage": name, "kind": "export", "artifact": "model.gguf"}))

    def run(stage):
        tags = {"farm.export_stage": stage}
        return SimpleNamespace(info=SimpleNamespace(run_id="r"), data=SimpleNamespace(tags=tags))
    for bad in ("../../outside", "export-0123456789ab/../../../outside", "/etc", "export-0123456789ab\n"):
        with pytest.raises(FarmError, match="not a stage name"):
            promote._export_record(run(bad))
    assert promote._export_record(run("export-0123456789ab"))["artifact"].endswith("model.gguf")


def test_a_submitted_job_quotes_its_entrypoint_and_sends_no_storage_secrets(tmp_path, monkeypatch):
    """`farm submit`: the job's entry point was one unquoted shell string (a sweep file's name could run a command),
    and FARM_STORAGE_OPTIONS, which may hold the store's credentials, went into the job's runtime_env (shown by
    the Ray dashboard). The options reach the job's nodes through $FARM_HOME/storage-options.json (0600)."""
    import json
    import shlex
    import stat

    import ray.job_submission

    from farm import storage
    from farm.run import jobs

    sent = {}

    class Client:
        def __init__(self, address):
            pass

        def submit_job(self, entrypoint, runtime_env):
            sent.update(entrypoint=entrypoint, runtime_env=runtime_env)
            return "job-1"

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    path = tmp_path / "my sweep; touch pwned.yaml"
    path.write_text((ROOT / "jobs" / "demo.yaml").read_text())
    options = {"endpoint_url": "http://minio:9000", "key": "AKIAEXAMPLE", "secret": "s3cr3t-value"}
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FARM_STORAGE", "s3://bucket/farm")
    monkeypatch.setenv("FARM_STORAGE_OPTIONS", json.dumps(options))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "token")
    assert jobs.submit_job(str(path), "http://127.0.0.1:9", wait=False) == 0
    assert shlex.split(sent["entrypoint"]) == ["python", "-m", "farm", "run", str(path)]
    assert "s3cr3t" not in json.dumps(sent["runtime_env"])
    assert "FARM_STORAGE_OPTIONS" not in sent["runtime_env"]["env_vars"]
    assert sent["runtime_env"]["env_vars"]["FARM_STORAGE"] == "s3://bucket/farm"
    kept = tmp_path / "home" / "storage-options.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    monkeypatch.delenv("FARM_STORAGE_OPTIONS")  # what a node of the job reads
    assert storage._options() == options
    kept.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        storage._options()


def test_farm_submit_follows_a_job_whose_log_stream_drops_until_it_ends(capsys):
    """The dashboard's log websocket drops mid-job: farm submit polls the log (printing only what is new) until
    the job ends, and returns the job's own exit status; before, it returned 1 while the job still ran."""
    from types import SimpleNamespace

    from ray.job_submission import JobStatus

    from farm.run import jobs

    log = "line 1\nline 2\n"
    states = iter([JobStatus.RUNNING, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.SUCCEEDED])

    class Client:
        def __init__(self):
            self.log = "line 1\n"

        async def tail_job_logs(self, job):
            yield "line 1\n"
            raise ConnectionError("websocket closed")

        def get_job_info(self, job):
            status = next(states)
            if status == JobStatus.SUCCEEDED:
                self.log = log + "line 3\n"
            elif self.log == "line 1\n":
                self.log = log
            return SimpleNamespace(status=status, driver_exit_code=0)

        def get_job_logs(self, job):
            return self.log

    jobs.follow(Client(), "raysubmit_1", poll_s=0)
    out = capsys.readouterr().out
    assert out.count("line 1") == 1 and out.count("line 2") == 1 and out.count("line 3") == 1
    assert "log stream dropped (ConnectionError" in out


def test_the_torch_baseline_prefills_like_a_serving_engine_last_logits_only(tiny_model_dir):
    """llama.cpp's prefill computes the last position's logits only; PyTorch computed every position's, which
    slowed its prefill and TTFT against llama.cpp's. Now it keeps the last (the same numbers), and every runtime
    says which it does (farm.runtime.prefill_logits)."""
    import numpy as np

    from farm.runtimes import load

    rt = load({"name": "torch"}, tiny_model_dir, threads=1, n_ctx=64)
    tokens = list(range(5, 25))
    assert np.allclose(rt.prefill(tokens), rt.logits(tokens)[-1], atol=1e-4)
    assert rt.settings["prefill_logits"] == "last"


def test_farm_status_with_mlflow_down_says_so_without_a_traceback(monkeypatch, capsys):
    import socket

    from farm import cli

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert cli.main(["status", "demo"]) == 1
    err = capsys.readouterr().err
    assert f"MLflow at http://127.0.0.1:{port} is unreachable" in err and "Traceback" not in err
