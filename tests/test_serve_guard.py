"""Issue 35, the served model's guards that need no running engine: `farm serve` on a host other machines
reach needs an API key, which the engines take from their environment (never a command line `ps` shows);
llama-server is started with its per-slot context bound and without /slots; a registered model's files are
checked against the checksum promote recorded before MLflow unpickles anything of it."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from farm.errors import FarmError


def test_farm_serve_on_a_host_other_machines_reach_requires_an_api_key(monkeypatch, capsys):
    from farm.decide import deploy

    assert deploy.api_key_for("127.0.0.1", None) is None
    assert deploy.api_key_for("localhost", None) is None and deploy.api_key_for("::1", None) is None
    assert deploy.api_key_for("0.0.0.0", "chosen") == "chosen"
    made = deploy.api_key_for("0.0.0.0", None)
    assert made and len(made) >= 32 and made != deploy.api_key_for("0.0.0.0", None)

    started = {}

    class Engine:
        url, log = "http://0.0.0.0:8000", Path("log")

        class proc:
            @staticmethod
            def wait():
                return 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def check_alive(self, doing):
            pass

    def engine_server(model, workdir, host, port, parallel, n_ctx, threads=None, lora=(), api_key=None):
        started["api_key"] = api_key
        return Engine()

    model = {"name": "m", "version": "1", "runtime": {"name": "llamacpp"}, "artifact": Path("m.gguf"), "threads": 2}
    monkeypatch.setattr(deploy, "resolve", lambda uri, dest: model)
    monkeypatch.setattr(deploy, "engine_server", engine_server)
    monkeypatch.delenv("FARM_API_KEY", raising=False)
    assert deploy.serve("models:/m@champion", "0.0.0.0", 8000, 1, None, None) == 0
    out = capsys.readouterr().out
    assert started["api_key"] and f"Authorization: Bearer {started['api_key']}" in out, out
    monkeypatch.setenv("FARM_API_KEY", "from-the-env")
    from farm import cli

    monkeypatch.setattr(deploy, "serve", lambda uri, host, port, *a, **kw: started.update(kw) or 0)
    assert cli.main(["serve", "models:/m@champion", "--host", "0.0.0.0"]) == 0
    assert started["api_key"] == "from-the-env"
    # MLflow's scoring server checks no key: it stays on loopback
    assert cli.main(["serve", "--mlflow", "models:/m@champion", "--host", "0.0.0.0"]) == 1
    assert "--mlflow" in capsys.readouterr().err


def test_engines_take_the_key_from_their_environment_and_llama_server_bounds_each_slot(tmp_path):
    from farm.serve import llamacpp_server, openvino_server

    srv = llamacpp_server.server(tmp_path / "m.gguf", tmp_path / "engine", 1, 4, 4096, host="0.0.0.0",
                                 api_key="s3cr3t-key")
    assert "s3cr3t-key" not in " ".join(srv.cmd) and srv.env["LLAMA_API_KEY"] == "s3cr3t-key"
    assert srv.api_key == "s3cr3t-key"
    cmd = srv.cmd
    assert cmd[cmd.index("--kv-unified-per-slot") + 1] == "1024"  # one request cannot overflow the others' cache
    assert "--no-slots" in cmd and "--slots" not in cmd  # /slots shows every user's prompt
    assert int(cmd[cmd.index("--timeout") + 1]) <= 30  # idle connections let go of their threads
    assert "LLAMA_API_KEY" not in (llamacpp_server.server(tmp_path / "m.gguf", tmp_path / "e2", 1, 1, 256).env or {})
    srv = openvino_server.server(tmp_path / "ir", tmp_path / "engine", 1, 4, 4096, api_key="s3cr3t-key")
    assert "s3cr3t-key" not in " ".join(srv.cmd) and srv.env["FARM_API_KEY"] == "s3cr3t-key"
    assert openvino_server.server(tmp_path / "ir", tmp_path / "e2", 1, 4, 4096).env["FARM_API_KEY"] == ""


class Planted:
    """A pickle that, when loaded, leaves a file behind: what a tampered python_model.pkl could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """An in-process sqlite MLflow with registered model `m`: version 1 as promoted (its files' checksum
    recorded), then its python_model.pkl swapped for one that plants a file; version 2 with no checksum."""
    import mlflow
    import yaml
    from mlflow.tracking import MlflowClient

    from farm import storage
    from farm.decide.deploy import files_sha256

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {
        "loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl"}}}))
    (model / "python_model.pkl").write_bytes(pickle.dumps("a harmless model"))
    c = MlflowClient()
    run = c.create_run(c.create_experiment("e", artifact_location=str(tmp_path / "store")))
    c.log_artifacts(run.info.run_id, str(model), "model")
    c.create_registered_model("m")
    for _ in range(2):
        c.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
    c.set_registered_model_alias("m", "champion", "1")
    c.set_registered_model_alias("m", "unchecked", "2")
    digest = files_sha256("models:/m/1", tmp_path / "promote-time")
    assert len(digest) == 64 and digest != storage.sha256(model)  # MLflow adds the version's own record
    c.set_model_version_tag("m", "1", "farm.model_sha256", digest)
    marker = tmp_path / "planted"
    stored = tmp_path / "store" / run.info.run_id / "artifacts" / "model" / "python_model.pkl"
    assert stored.is_file()
    return {"client": c, "marker": marker, "stored": stored, "digest": digest, "tmp": tmp_path}


def test_a_registered_model_whose_files_changed_is_refused_before_it_is_unpickled(registry):
    from farm.decide import deploy
    from farm.decide.promote import generate

    ok = deploy.verified_model("models:/m@champion", registry["tmp"] / "ok")
    assert (ok / "python_model.pkl").is_file()  # as promoted: handed over
    registry["stored"].write_bytes(pickle.dumps(Planted(registry["marker"])))
    with pytest.raises(FarmError, match=r"models:/m@champion \(m v1\).*changed since it was promoted.*farm promote"):
        generate("models:/m@champion", ["hello"])
    with pytest.raises(FarmError, match=r"m v2.*records no checksum.*farm promote"):
        generate("models:/m@unchecked", ["hello"])
    assert not registry["marker"].exists(), "the tampered pickle was loaded"


def test_farm_serve_mlflow_checks_the_files_before_it_starts_mlflows_server(registry, monkeypatch):
    import subprocess

    from farm.decide import deploy

    started = []

    class Popen:  # MLflow's scoring server, given a verified local copy rather than the models:/ URI
        def __init__(self, cmd, **kw):
            assert cmd[1:3] == ["models", "serve"] and (Path(cmd[cmd.index("-m") + 1]) / "python_model.pkl").is_file()
            started.append(cmd)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Popen)
    assert deploy.serve_mlflow("models:/m@champion", "127.0.0.1", 5001) == 0
    registry["stored"].write_bytes(pickle.dumps(Planted(registry["marker"])))
    with pytest.raises(FarmError, match="changed since it was promoted"):
        deploy.serve_mlflow("models:/m@champion", "127.0.0.1", 5001)
    assert len(started) == 1 and not registry["marker"].exists()
