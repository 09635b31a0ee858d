"""Delivery to MLflow (an in-process sqlite store): a lost reply does not make a second parent run, and a
record MLflow refuses for good is parked with its reason instead of blocking every record behind it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from farm.plan import grid
from farm.record import cells, outbox
from farm.sweep import spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mlflow_here(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FARM_TRACKING_WAIT_S", "30")
    sweep = spec.parse(copy.deepcopy(yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())))
    return sweep, grid.build(sweep)


def test_a_lost_reply_does_not_make_a_second_parent_run(mlflow_here, monkeypatch):
    sweep, g = mlflow_here
    real = outbox.MlflowClient.create_run
    calls = []

    def lossy(self, *a, **k):  # the server makes the run, the reply is lost on the way back
        run = real(self, *a, **k)
        calls.append(run.info.run_id)
        if len(calls) == 1:
            raise ConnectionError("reply lost")
        return run

    monkeypatch.setattr(outbox.MlflowClient, "create_run", lossy)
    monkeypatch.setattr(outbox.time, "sleep", lambda s: None)
    log = outbox.SweepLog(sweep, g, "name: demo")
    c = outbox.client()
    parents = c.search_runs([log.experiment_id], "tags.`farm.kind` = 'sweep'")
    assert len(calls) == 1 and [r.info.run_id for r in parents] == [log.run_id] == calls


def test_a_record_mlflow_refuses_for_good_is_parked_and_the_rest_delivered(mlflow_here):
    sweep, g = mlflow_here
    log = outbox.SweepLog(sweep, g, "name: demo")
    bad, good = g.cells[0], g.cells[1]
    record = cells.cell_record(log.experiment_id, log.run_id, bad, None, {}, None, None)
    record["params"]["not a valid key!"] = "x"  # MLflow refuses this param name: INVALID_PARAMETER_VALUE
    log.seq += 1
    log.outbox.mkdir(parents=True, exist_ok=True)
    (log.outbox / f"{log.seq:06d}.json").write_text(json.dumps(record))
    assert log.log_cell(good, None, {}) == 0  # the good one behind it got through
    [(path, why)] = outbox.parked()
    assert path.parent.name == "parked" and "not a valid key" in why
    runs = outbox.client().search_runs([log.experiment_id], "tags.`farm.kind` = 'cell'")
    assert {r.data.tags["farm.cell_id"] for r in runs if r.info.status == "FINISHED"} == {good.id}


def test_what_a_job_writes_after_its_records_waits_out_an_mlflow_restart(monkeypatch):
    """The soak found it: a sweep whose records were delivered, ending while the server restarted, died in the
    Pareto step's direct writes. They are now retried while MLflow is unreachable; other errors are not."""
    from mlflow.exceptions import MlflowException

    monkeypatch.setattr(outbox.time, "sleep", lambda s: None)
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) < 3:
            raise MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with "
                                  "exception HTTPConnectionPool: Max retries exceeded (Connection refused)")
        return x * 2

    assert outbox.while_unreachable("the front", flaky, 21) == 42 and calls == [21, 21, 21]

    def broken():
        raise KeyError("a bug, not an outage")

    with pytest.raises(KeyError):
        outbox.while_unreachable("the front", broken)
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    refused = MlflowException("bad request", error_code=INVALID_PARAMETER_VALUE)
    with pytest.raises(MlflowException):  # a 400 is refused for good: not retried for an hour
        outbox.while_unreachable("the front", lambda: (_ for _ in ()).throw(refused))


def test_a_training_curve_lands_as_metric_histories_once_however_often_it_is_delivered(mlflow_here):
    sweep, g = mlflow_here
    log = outbox.SweepLog(sweep, g, "name: demo")
    step = {"params": {"step": {"method": "sft"}}, "info": {
        "steps": 3, "train_seconds": 1.5, "curve": {"train_loss": [2.0, 1.5, 1.2], "val_loss": [[0, 2.2], [3, 1.4]]}}}
    again = {"params": {"step": {"method": "sft"}}, "info": {"steps": 1}}  # a second sft step: a name MLflow takes
    record = cells.cell_record(log.experiment_id, log.run_id, g.cells[1], None, {}, None, None, [step, again])
    log.outbox.mkdir(parents=True, exist_ok=True)
    c = outbox.client()
    for _ in range(2):  # a delivery whose reply was lost is repeated: the same record again
        path = log.outbox / "000099.json"
        path.write_text(json.dumps(record))
        outbox._deliver(c, json.loads(path.read_text()), path)
        record = json.loads(path.read_text())  # with the run id the first delivery recorded
    [run] = c.search_runs([log.experiment_id], f"tags.`farm.cell_id` = '{g.cells[1].id}'")
    hist = {k: sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, k))
            for k in ("sft.train_loss", "sft.val_loss")}
    assert hist == {"sft.train_loss": [(1, 2.0), (2, 1.5), (3, 1.2)], "sft.val_loss": [(0, 2.2), (3, 1.4)]}
    assert run.data.metrics["sft.train_seconds"] == 1.5 and run.data.metrics["sft.steps"] == 3
    assert run.data.metrics["sft_2.steps"] == 1 and not outbox.parked()


def test_a_refused_record_does_not_leave_its_cell_run_running(mlflow_here):
    sweep, g = mlflow_here
    log = outbox.SweepLog(sweep, g, "name: demo")
    record = cells.cell_record(log.experiment_id, log.run_id, g.cells[0], None, {}, None, None)
    record["params"]["not a valid key!"] = "x"  # the run is created, then its batch is refused
    log.seq += 1
    log.outbox.mkdir(parents=True, exist_ok=True)
    (log.outbox / f"{log.seq:06d}.json").write_text(json.dumps(record))
    assert log.flush() == 0
    [run] = outbox.client().search_runs([log.experiment_id], "tags.`farm.kind` = 'cell'")
    assert run.info.status == "FAILED" and "not a valid key" in run.data.tags["farm.refused"]


def test_failed_later_measurements_make_the_sweep_partial(mlflow_here):
    from farm.run.driver import exit_code

    sweep, g = mlflow_here
    log = outbox.SweepLog(sweep, g, "name: demo")
    assert log.outcome(0) == "complete" and exit_code(len(g.cells), 0, 0) == 0
    for cell in g.cells[:2]:
        log.log_cell(cell, None, {})
    log.log_update(g.cells[0], "tasks", None, RuntimeError("lm-eval crashed"))
    log.log_update(g.cells[1], "serve", None, RuntimeError("llama-server died"))
    assert log.outcome(0) == ("partial: 1 serve measurement(s) failed, 1 tasks measurement(s) failed "
                              "(`farm status` lists why)")
    assert exit_code(len(g.cells), 0, sum(log.later_failed.values())) == 3
    log.finish(0)
    parent = outbox.client().get_run(log.run_id)
    assert parent.data.tags["farm.outcome"].startswith("partial: 1 serve") and parent.data.metrics["later_failed"] == 2


def test_a_job_stopped_by_an_error_marks_its_parent_run_killed_even_when_the_disk_is_full(mlflow_here, monkeypatch):
    sweep, g = mlflow_here
    log = outbox.SweepLog(sweep, g, "name: demo")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outbox.storage, "atomic_write_text", full)
    log.abort("OSError: [Errno 28] No space left on device")
    parent = outbox.client().get_run(log.run_id)
    assert parent.info.status == "KILLED" and "No space left" in parent.data.tags["farm.stopped"]


def test_ctrl_c_of_farm_run_marks_its_parent_run_killed(mlflow_here, monkeypatch):
    from farm.run import driver

    monkeypatch.setattr(driver.ray, "init", lambda **k: None)
    monkeypatch.setattr(driver, "submit", lambda g, s: {})
    monkeypatch.setattr(driver.ray, "get_runtime_context", lambda: SimpleNamespace(get_job_id=lambda: "01000000"))

    def interrupted(self, refs):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver.Job, "sweep_phase", interrupted)
    with pytest.raises(KeyboardInterrupt):
        driver.run(str(ROOT / "jobs" / "demo.yaml"))
    c = outbox.client()
    [parent] = c.search_runs([c.get_experiment_by_name("demo").experiment_id], "tags.`farm.kind` = 'sweep'")
    assert parent.info.status == "KILLED" and parent.data.tags["farm.stopped"] == "interrupted (Ctrl-C)"


def test_farm_status_names_an_empty_error_and_the_later_phases_failures(mlflow_here):
    from farm.decide.status import status_report

    sweep, g = mlflow_here
    log = outbox.SweepLog(sweep, g, "name: demo")
    log.log_cell(g.cells[0], None, {}, error=MemoryError())  # an exception with no message
    log.log_cell(g.cells[1], None, {})
    log.log_update(g.cells[1], "serve", None, RuntimeError("llama-server died"))
    log.finish(1)
    text = status_report("demo")
    assert f"FAILED    {cells.cell_label(g.cells[0])}: MemoryError" in text, text
    assert "serve FAILED: llama-server died" in text and "outcome: partial: 1 of" in text, text
