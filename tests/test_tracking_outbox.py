"""A tracking outage of any length loses nothing: a real MLflow server on 127.0.0.1 is stopped, cells
queue in the on-disk outbox while the sweep goes on, and are delivered, once each, when it returns —
within the sweep (flush / finish) or later (`farm sync`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from farm.errors import FarmError
from farm.plan import grid
from farm.record import cells, outbox
from farm.sweep import spec

pytestmark = pytest.mark.slow  # a real MLflow server; the tiny model only
VENV_BIN = Path(sys.executable).parent
DATA = {"files": [], "calib_tokens": 1024, "eval_windows": 2, "eval_window_tokens": 64}


class Server:
    def __init__(self, home: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.home, self.proc = home, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self):
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.home}/mlflow.db", "--serve-artifacts",
             "--artifacts-destination", str(self.home / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)


@pytest.fixture
def server(tmp_path, monkeypatch):
    srv = Server(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail over at once in the test
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def _cells(tiny_model_dir, name):
    sweep = spec.parse({"name": name, "base": {"model": str(tiny_model_dir)}, "data": DATA, "pipelines": [[]],
                        "exports": [{"format": "gguf", "quant": "Q8_0"}]})
    return sweep, grid.build(sweep)


def _results(cell):
    evaluate = {"metrics": {"perplexity": 12.5, "kl_div": 0.01, "top1_agree": 0.9}, "cached": False}
    bench = {"metrics": {"decode_tok_s": 100.0, "size_mb": 3.0}, "cached": False, "threads": 1,
             "contaminated": False, "host": {}}
    return None, {"evaluate": evaluate, "bench": bench}


def _cell_runs(c, log):
    return c.search_runs([log.experiment_id], f"tags.`mlflow.parentRunId` = '{log.run_id}'")


def test_cells_wait_in_the_outbox_through_an_outage(server, tiny_model_dir):
    sweep, g = _cells(tiny_model_dir, "outbox")
    log = outbox.SweepLog(sweep, g, "name: outbox\n")
    first, second = g.cells
    assert log.log_cell(first, *_results(first)) == 0  # delivered at once
    server.stop()  # the server goes away for as long as it likes ...
    assert log.log_cell(second, *_results(second), error_text="Traceback ...\nRuntimeError: boom") == 1
    assert len(list(log.outbox.glob("*.json"))) == 1 and log.flush() == 1
    server.start()  # ... and comes back
    log.finish(failed=1)
    assert not log.outbox.exists()
    c = outbox.client()
    runs = {r.data.tags["farm.cell_id"]: r for r in _cell_runs(c, log)}
    assert set(runs) == {first.id, second.id}  # both there, once each
    assert runs[first.id].info.status == "FINISHED" and runs[first.id].data.metrics["perplexity"] == 12.5
    assert runs[second.id].info.status == "FAILED" and runs[second.id].data.tags["farm.error"] == "RuntimeError: boom"
    assert "error.txt" in {a.path for a in c.list_artifacts(runs[second.id].info.run_id)}
    parent = c.get_run(log.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["cells_failed"] == 1  # partial: a front to see
    assert parent.data.tags["farm.outcome"].startswith("partial: 1 of 2 cells failed")


def test_a_lost_reply_does_not_make_a_second_run(server, tiny_model_dir):
    sweep, g = _cells(tiny_model_dir, "lost-reply")
    log = outbox.SweepLog(sweep, g, "name: lost-reply\n")
    cell = g.cells[0]
    record = cells.cell_record(log.experiment_id, log.run_id, cell, *_results(cell), None, None)
    c = outbox.client()
    # an earlier attempt created the run, then the connection dropped before its reply came back
    c.create_run(log.experiment_id, run_name=record["run_name"],
                 tags={k: record["tags"][k] for k in ("mlflow.parentRunId", "farm.kind", "farm.cell_id")})
    record["attempts"] = 1
    path = log.outbox / "000099.json"
    outbox.storage.atomic_write_text(path, outbox.json.dumps(record))
    assert log.flush() == 0
    [run] = _cell_runs(c, log)
    assert run.info.status == "FINISHED" and run.data.metrics["decode_tok_s"] == 100.0


def test_an_outage_past_the_wait_is_kept_for_farm_sync(server, tiny_model_dir, monkeypatch):
    sweep, g = _cells(tiny_model_dir, "sync-later")
    log = outbox.SweepLog(sweep, g, "name: sync-later\n")
    server.stop()
    for cell in g.cells:
        log.log_cell(cell, *_results(cell))
    monkeypatch.setenv("FARM_TRACKING_WAIT_S", "0")
    with pytest.raises(FarmError, match="farm sync"):
        log.finish(failed=0)
    assert len(list(log.outbox.glob("*.json"))) == 3  # two cells and the parent's end
    server.start()
    assert outbox.sync() == 0 and not log.outbox.exists()
    c = outbox.client()
    assert len(_cell_runs(c, log)) == 2 and c.get_run(log.run_id).info.status == "FINISHED"
