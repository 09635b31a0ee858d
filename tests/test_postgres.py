"""MLflow on a PostgreSQL backend (what the cluster configs run; sqlite serialises every writer): a real
PostgreSQL server (Debian's postgresql package) and an MLflow server on 127.0.0.1, and two sweeps logging
at once through farm's outbox — every cell of both accounted for once, the front read back."""

from __future__ import annotations

import copy
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from farm.plan import grid
from farm.record import outbox
from farm.sweep import spec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as Debian's postgres user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("no PostgreSQL server here: apt-get install postgresql (Debian's package)")
    bin_dir = Path(found[-1]).parent
    data = Path(tempfile.mkdtemp(prefix="farm-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data / "db"), "-U", "farm", "--auth=trust"]),
                   check=True, capture_output=True)
    server = subprocess.Popen(_as_postgres([str(bin_dir / "postgres"), "-D", str(data / "db"), "-h", "127.0.0.1",
                                            "-p", str(port), "-k", str(data)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            if subprocess.run([str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                              capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.5)
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "farm", "mlflow"],
                       check=True)
        yield f"postgresql://farm@127.0.0.1:{port}/mlflow"
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres, tmp_path_factory):
    port, art = _free_port(), tmp_path_factory.mktemp("artifacts")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(art / "mlflow.log", "w") as log:
        server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", "1", "--backend-store-uri", postgres,
                                   "--serve-artifacts", "--artifacts-destination", str(art)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (art / "mlflow.log").read_text()[-3000:]
                time.sleep(1)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=60)


def _sweep(name: str):
    d = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    d["name"] = name
    sweep = spec.parse(copy.deepcopy(d))
    return sweep, grid.build(sweep)


def test_two_sweeps_log_at_once_into_postgresql(mlflow_on_postgres, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_on_postgres)
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    sweeps = [_sweep("pg-a"), _sweep("pg-b")]
    logs, errors = {}, []

    def log_sweep(sweep, g):
        try:
            log = outbox.SweepLog(sweep, g, f"name: {sweep.name}")
            for i, cell in enumerate(g.cells):
                bench = {"metrics": {"decode_tok_s": 10.0 + i, "prefill_tok_s": 100.0}, "threads": 2}
                evaluate = {"metrics": {"perplexity": 20.0 - i / 10, "kl_vs_fp32": i / 100}}
                assert log.log_cell(cell, None, {"evaluate": evaluate, "bench": bench}) == 0
            log.finish(0)
            logs[sweep.name] = (log, g)
        except BaseException as e:  # noqa: BLE001 — a thread's failure, surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=log_sweep, args=s) for s in sweeps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    c = outbox.client()
    for name, (log, g) in logs.items():
        exp = c.get_experiment_by_name(name)
        runs = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'cell'", max_results=1000)
        assert sorted(r.data.tags["farm.cell_id"] for r in runs) == sorted(cell.id for cell in g.cells)
        assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == log.run_id for r in runs)
        [parent] = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'sweep'")
        assert parent.info.status == "FINISHED"
        assert len(c.get_metric_history(runs[0].info.run_id, "decode_tok_s")) == 1  # logged once, not retried twice
    assert not list((tmp_path / "home" / "outbox").rglob("*.json"))  # nothing left waiting


def test_the_cluster_configs_run_mlflow_on_postgresql():
    """What the test above checks is what the cluster configs use: a postgresql:// backend store."""
    for config in ("clusters/aws/farm.yaml", "clusters/kuberay/raycluster.yaml"):
        text = (ROOT / config).read_text()
        assert "--backend-store-uri postgresql://" in text and "sqlite:" not in text, config
