"""End to end, as a user runs it: the project's scripts start a real MLflow server and a two-node Ray
cluster on 127.0.0.1 (head pinned to core 0 and labelled farm/node=a, a second raylet pinned to core 1
and labelled farm/node=b; ports of their own, so a running `make demo` cluster is left alone).
`ray job submit` runs sweeps of a tiny in-process model from a local directory, then `farm pareto` and
`farm promote`, and the registered model is loaded back through MLflow and generates text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PORTS = {"RAY_PORT": "16379", "RAY_DASHBOARD_PORT": "18265", "MLFLOW_PORT": "15000", "FARM_PORT_BASE": "16400"}
METRIC_NAMES = ["perplexity", "kl_div", "top1_agree", "prefill_tok_s", "decode_tok_s", "ttft_ms",
                "token_latency_p50_ms", "token_latency_p90_ms", "peak_rss_mb", "size_mb"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("farm-home")
    env = {**os.environ, **PORTS, "FARM_HOME": str(home), "FARM_EXTRA_LABELS": "farm/test=e2e farm/node=a",
           "FARM_HEAD_CPUS": "1", "FARM_HEAD_CPUSET": "0", "FARM_JOINABLE": "1",  # a second raylet joins
           "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{PORTS['MLFLOW_PORT']}",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FARM_STORAGE", None)
    try:
        subprocess.run([str(ROOT / "clusters/local/up.sh")], env=env, check=True, timeout=300)
        subprocess.run([str(ROOT / "clusters/local/add-node.sh"), "b", "1"], env=env, check=True, timeout=120)
        yield env
    finally:
        subprocess.run([str(ROOT / "clusters/local/down.sh")], check=False, env=env, timeout=120)


def submit(env, sweep_file: Path, **env_vars) -> subprocess.CompletedProcess:
    runtime_env = {"env_vars": {"FARM_HOME": env["FARM_HOME"], "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"],
                                **env_vars}}
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{PORTS['RAY_DASHBOARD_PORT']}",
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "farm", "run", str(sweep_file)]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=1200)


def farm(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "farm"), *args], check=False, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def tiny_sweep(cluster, tiny_model_dir, tmp_path_factory) -> subprocess.CompletedProcess:
    """The main sweep ('tiny'), submitted once through `farm submit` (not the long `ray job submit` line:
    working dir, runtime env and token handled); whichever test asks first runs it."""
    sweep = {
        "name": "tiny",
        "base": {"model": str(tiny_model_dir)},
        "data": {"calib_tokens": 512, "eval_windows": 2, "eval_window_tokens": 64},
        "pipelines": [[], [{"method": "prune_layers", "drop": 1, "calib_samples": 2, "seq_len": 64}]],
        "exports": [{"format": "gguf", "quant": ["F16", "Q4_0"]},
                    {"format": "onnx", "quant": "int4", "group_size": 32},
                    {"format": "openvino", "quant": "int4_asym", "algorithm": "awq_se", "group_size": 32,
                     "calib_samples": 2, "calib_seq_len": 64}],
        "targets": [{"name": "tagged", "labels": {"farm/test": "e2e"}}],
        "bench": {"prompt_tokens": 16, "decode_tokens": 8, "warmup": 1, "repeats": 2},
        "objectives": {"kl_div": "min", "decode_tok_s": "max"},
        "promote": {"model_name": "tiny-llm", "alias": "champion", "metric": "decode_tok_s"},
        "serve": {"cells": "format_front", "per_runtime": 1, "concurrency": [1, 2], "requests": 2,
                  "prompt_tokens": 32, "output_tokens": 8, "shared_prefix_tokens": 16},
        "tasks": {"items": {"piqa": 6, "winogrande": 6}, "cells": "front"},
    }
    f = tmp_path_factory.mktemp("tiny-sweep") / "tiny.yaml"
    f.write_text(yaml.safe_dump(sweep))
    dashboard = f"http://127.0.0.1:{PORTS['RAY_DASHBOARD_PORT']}"
    user_env = {k: v for k, v in cluster.items() if k != "RAY_AUTH_MODE"}  # a user's shell need not set it
    res = subprocess.run([str(VENV_BIN / "farm"), "submit", str(f)], check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=1200, env={**user_env, "RAY_ADDRESS": dashboard, "FARM_PROGRESS_S": "3"})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def promoted(cluster, tiny_sweep) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The main sweep's Pareto front tagged (`farm pareto`) and its champion promoted (`farm promote`), once."""
    pareto = farm(cluster, "pareto", "tiny")
    assert pareto.returncode == 0, pareto.stderr
    promote = farm(cluster, "promote", "tiny")
    assert promote.returncode == 0, promote.stderr
    return pareto, promote


def sweep_cells(c, name: str):
    """(the sweep's parent run, its cell runs)."""
    exp = c.get_experiment_by_name(name)
    [parent] = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'sweep'")
    return parent, c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def test_sweep_through_ray_and_mlflow(cluster, tiny_sweep):
    from mlflow.tracking import MlflowClient

    res = tiny_sweep
    assert "9 cells finished, 0 failed" in res.stdout
    # the job log shows stage-level progress as the sweep runs, with what runs where
    progress = [ln for ln in res.stdout.splitlines() if ln.startswith("farm: ") and " | stages " in ln]
    assert progress and all(" | ETA " in ln for ln in progress), res.stdout[-3000:]
    assert any("cells " in ln for ln in progress) and any(" | running: " in ln and " on " in ln for ln in progress)
    # the later phases say where they are too ('farm: 5s tasks | stages 0/4 done ...'), their cells logged before
    assert any(ln.split(" | ")[0].endswith(" tasks") and "cells " not in ln for ln in progress), progress
    status = farm(cluster, "status", "tiny")
    assert status.returncode == 0 and "tiny: FINISHED" in status.stdout and "9/9 cells logged, 0 failed" in status.stdout
    assert status.stdout.count("FINISHED  ") == 9 and "progress: farm: " in status.stdout, status.stdout

    c = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    parent, cells = sweep_cells(c, "tiny")
    assert parent.info.status == "FINISHED"
    assert len(cells) == 9
    assert {r.data.params["export.format"] for r in cells} == {"gguf", "onnx", "openvino", "torch"}
    for r in cells:
        assert r.info.status == "FINISHED"
        assert set(METRIC_NAMES) <= set(r.data.metrics)
        assert {"compress.method", "export.format", "export.quant", "target.name"} <= set(r.data.params)
        tags = r.data.tags
        assert tags["farm.node.farm/test"] == "e2e"  # landed on the node its label selector asked for
        assert tags["farm.node.farm/isa"] and tags["farm.cpu_model"] and tags["farm.cell_id"]
        assert tags["farm.version.llama-cpp-python"] and tags["farm.version.transformers"]
        assert tags["farm.artifact_uri"].startswith("file://")
        if r.data.params["export.format"] == "gguf":  # which CPU code llama.cpp ran
            assert tags["farm.runtime.cpu_variant"] not in ("", "static", "sapphirerapids"), tags
            assert tags["farm.runtime.amx"] == "false" and tags["farm.runtime.repack"] == "true"
        names = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"cell_spec.json", "bench.json", "stages.json"} <= names
    baseline = [r for r in cells if r.data.tags["farm.baseline"] == "true"]
    assert len(baseline) == 1 and baseline[0].data.params["export.format"] == "torch"
    assert {r.data.params["compress.method"] for r in cells} == {"none", "prune_layers"}


def test_pareto_front_and_promotion_of_its_best_cell(cluster, promoted):
    """`farm pareto` tags the front and reports the pick; `farm promote` registers the front's best cell by the
    promote metric, and the registered model loads back through MLflow and generates text."""
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    pareto, _ = promoted
    assert "promote policy (decode_tok_s) picks" in pareto.stdout
    c = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    parent, cells = sweep_cells(c, "tiny")
    on_front = [r for r in cells if r.data.tags.get("farm.pareto") == "true"]
    assert on_front and all(r.data.tags.get("farm.pareto") in ("true", "false") for r in cells)
    assert {"pareto.txt", "pareto.png", "pareto.json"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
    version = c.get_model_version_by_alias("tiny-llm", "champion")
    best = max(on_front, key=lambda r: r.data.metrics["decode_tok_s"])
    assert c.get_run(version.run_id).info.run_id == best.info.run_id
    # where its numbers came from: the sweep, the cell, the machine and the time of its benchmark
    assert best.data.tags["farm.label"] in version.description and "measured on" in version.description
    assert best.data.tags["farm.hostname"] in version.description
    # the job wrote the sweep's report onto its parent run; the experiment says what the sweep found
    assert "report.html" in {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert "Champion" in c.get_experiment(parent.info.experiment_id).tags["mlflow.note.content"]
    [base] = [r for r in cells if r.data.tags["farm.baseline"] == "true"]
    for r in cells:  # every cell's memory roofline, and its speed against the baseline (unless that was disturbed)
        assert r.data.metrics["roofline_efficiency"] > 0 and r.data.metrics["bytes_per_token_mb"] > 0
        if base.data.tags["farm.bench.contaminated"] != "true":
            assert r.data.metrics["speedup_vs_torch"] > 0

    mlflow.set_tracking_uri(cluster["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model("models:/tiny-llm@champion")
    out = model.predict(["The if statement"], params={"max_tokens": 5})
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str) and out[0]


def test_promoting_the_same_artifact_again_changes_nothing(cluster, promoted):
    """After the main sweep's promotion: the same pick keeps its version and alias."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    before = c.get_model_version_by_alias("tiny-llm", "champion")
    res = farm(cluster, "promote", "tiny")
    assert res.returncode == 0 and "already is" in res.stdout, res.stdout + res.stderr
    assert c.get_model_version_by_alias("tiny-llm", "champion").version == before.version
    assert before.tags["farm.artifact_uri"].startswith("file://")


def test_tasks_phase_scores_the_gate_and_the_front_through_their_runtimes(cluster, tiny_sweep):
    """After the bench phase, lm-eval's tasks through each cell's runtime: every runtime's full-precision base cell
    (the gate, checked against the PyTorch baseline's answers) and every cell on the front; the rest are not
    scored. Each scored run holds acc / stderr / items per task, the mean, and the per-item answers."""
    from mlflow.tracking import MlflowClient

    assert "farm: tasks (piqa 6, winogrande 6 items)" in tiny_sweep.stdout, tiny_sweep.stdout[-3000:]
    assert "picks the PyTorch baseline's answer on" in tiny_sweep.stdout
    c = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    _, cells = sweep_cells(c, "tiny")
    scored = [r for r in cells if "task_acc_mean" in r.data.metrics]
    label = {r.info.run_id: r.data.tags["farm.label"] for r in cells}
    gate = {label[r.info.run_id] for r in scored if "task_consistency" in r.data.metrics}
    assert {"base/torch-fp32@tagged", "base/gguf-F16@tagged"} <= gate, sorted(label.values())
    front = [r for r in cells if r.data.tags.get("farm.pareto") == "true"]
    assert front and {r.info.run_id for r in front} <= {r.info.run_id for r in scored}
    assert len(scored) < len(cells)  # cells off the front are not scored
    for r in scored:
        m = r.data.metrics
        assert m["items.piqa"] == 6 and m["items.winogrande"] == 6 and 0 <= m["acc.piqa"] <= 1
        assert {"acc_stderr.piqa", "acc_norm.piqa", "acc.winogrande", "task_s_per_item"} <= set(m)
        assert "tasks.json" in {a.path for a in c.list_artifacts(r.info.run_id)}
    baseline = next(r for r in scored if r.data.tags["farm.baseline"] == "true")
    assert baseline.data.metrics["task_consistency"] == 1.0


def test_serve_phase_logs_curves_for_each_engine(cluster, tiny_sweep):
    """After the bench phase, one cell per serving engine (its own front's fastest) is served under load:
    its run holds metrics whose steps are the concurrency levels, a table and a plot; the parent a summary."""
    from mlflow.tracking import MlflowClient

    assert "farm: serve benchmark (format_front, concurrency [1, 2]) of 2 cell(s)" in tiny_sweep.stdout
    c = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    parent, cells = sweep_cells(c, "tiny")
    served = [r for r in cells if "farm.serve.engine" in r.data.tags]
    assert sorted(r.data.params["export.format"] for r in served) == ["gguf", "openvino"], tiny_sweep.stdout[-3000:]
    for r in served:
        for key in ("serve_output_tok_s", "serve_ttft_p50_ms", "serve_itl_p50_ms", "serve_prefix_ttft_p50_ms"):
            assert sorted(m.step for m in c.get_metric_history(r.info.run_id, key)) == [1, 2], key
        assert {"serve.json", "serve.txt", "serve.png"} <= {a.path for a in c.list_artifacts(r.info.run_id)}
    assert {"serve.txt", "serve.png"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}


def test_serve_a_promoted_gguf_with_the_openai_api_and_chat_with_it(cluster, promoted, tmp_path):
    """`farm serve models:/tiny-llm@served` starts llama-server with the OpenAI API on 127.0.0.1; `farm chat`
    holds a two-turn conversation against it; `farm loadtest` loads it and logs against the version."""
    import time
    import urllib.request

    from mlflow.tracking import MlflowClient

    c = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    _, cells = sweep_cells(c, "tiny")
    gguf = next(r for r in cells if r.data.params["export.format"] == "gguf")
    res = farm(cluster, "promote", "tiny", "--run", gguf.info.run_id, "--alias", "served")
    assert res.returncode == 0, res.stdout + res.stderr
    port = 15102
    proc = subprocess.Popen([str(VENV_BIN / "farm"), "serve", "models:/tiny-llm@served", "--port", str(port),
                             "--parallel", "2"], env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("farm serve did not answer /health within 120 s")
        body = json.dumps({"model": "tiny-llm", "max_tokens": 4,
                           "messages": [{"role": "user", "content": "The if statement"}]}).encode()
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["choices"][0]["message"]["role"] == "assistant" and answer["usage"]["completion_tokens"] >= 1
        chat = subprocess.run([str(VENV_BIN / "farm"), "chat", url, "--max-tokens", "4"], input="hello\nand then\n\n",
                              env=cluster, capture_output=True, text=True, timeout=120)
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.count("you> ") == 3 and chat.stdout.count("tiny-llm> ") == 2, chat.stdout
        load = farm(cluster, "loadtest", url, "--concurrency", "1,2", "--requests", "2", "--output-tokens", "4",
                    "--prompt-tokens", "24", "--shared-prefix-tokens", "0", "--registered", "models:/tiny-llm@served")
        assert load.returncode == 0, load.stdout + load.stderr
        version = c.get_model_version_by_alias("tiny-llm", "served")
        run = c.get_run(version.tags["farm.loadtest_run"])
        assert run.data.tags["farm.model_version"] == version.version
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "serve_output_tok_s")) == [1, 2]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_serve_the_champion_through_mlflow_pyfunc(cluster, promoted):
    """`farm serve --mlflow models:/tiny-llm@champion` answers POST /invocations on 127.0.0.1 (any format)."""
    import time
    import urllib.request

    port = 15101
    proc = subprocess.Popen([str(VENV_BIN / "farm"), "serve", "--mlflow", "models:/tiny-llm@champion", "--port",
                             str(port)],
                            env=cluster, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        body = json.dumps({"inputs": ["The if statement"], "params": {"max_tokens": 4}}).encode()
        for _ in range(120):
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as r:
                    answer = json.loads(r.read())
                break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError("the model server did not answer within 120 s")
        assert isinstance(answer["predictions"], list) and len(answer["predictions"]) == 1
        assert isinstance(answer["predictions"][0], str)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_bad_sweep_fails_fast_and_writes_nothing(cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    bad = {"name": "broken", "base": {"model": "/no/such/model"}, "exports": [{"format": "gguf", "quant": "Q4_KM"}],
           "bench": {"repaets": 3}}
    f = tmp_path / "broken.yaml"
    f.write_text(yaml.safe_dump(bad))
    res = farm(cluster, "validate", str(f))
    assert res.returncode == 2
    for needle in ("base.model:", "exports[0].quant:", "did you mean 'Q4_K_M'", "bench.repaets"):
        assert needle in res.stderr
    res = submit(cluster, f)
    assert res.returncode != 0 and "bench.repaets" in res.stdout + res.stderr
    assert MlflowClient(cluster["MLFLOW_TRACKING_URI"]).get_experiment_by_name("broken") is None


def test_benchmarks_land_on_the_nodes_their_labels_select(cluster, tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    sweep = {
        "name": "placement",
        "base": {"model": str(tiny_model_dir)},
        "data": {"calib_tokens": 512, "eval_windows": 1, "eval_window_tokens": 32},
        "exports": [{"format": "gguf", "quant": "Q8_0"}],
        "targets": [{"name": "on-a", "labels": {"farm/node": "a"}}, {"name": "on-b", "labels": {"farm/node": "b"}},
                    {"name": "not-a", "labels": {"farm/node": "!a"}}],
        "bench": {"prompt_tokens": 16, "decode_tokens": 8, "warmup": 0, "repeats": 1},
    }
    f = tmp_path / "placement.yaml"
    f.write_text(yaml.safe_dump(sweep))
    res = submit(cluster, f)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    c = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("placement")
    cells = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'cell'")
    assert len(cells) == 2 * 3
    want = {"on-a": "a", "on-b": "b", "not-a": "b"}
    node_ids = {}
    for r in cells:
        target = r.data.params["target.name"]
        assert r.data.tags["farm.node.farm/node"] == want[target], (target, r.data.tags)
        assert r.data.tags["farm.bench.threads"] == "1"  # a 1-CPU node: the benchmark takes its one CPU
        node_ids.setdefault(want[target], set()).add(r.data.tags["farm.node_id"])
    assert all(len(ids) == 1 for ids in node_ids.values()) and node_ids["a"] != node_ids["b"]


def test_a_target_no_node_satisfies_fails_before_anything_runs(cluster, tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    sweep = {"name": "nowhere", "base": {"model": str(tiny_model_dir)},
             "exports": [{"format": "gguf", "quant": "Q8_0"}],
             "targets": [{"name": "elsewhere", "labels": {"farm/node": "in(c,d)"}}]}
    f = tmp_path / "nowhere.yaml"
    f.write_text(yaml.safe_dump(sweep))
    res = submit(cluster, f)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "targets[0] 'elsewhere': no alive node" in out
    assert "farm/node': 'b'" in out  # the message lists the cluster's label inventory
    assert MlflowClient(cluster["MLFLOW_TRACKING_URI"]).get_experiment_by_name("nowhere") is None


def test_a_sweep_through_an_s3_store(cluster, tiny_model_dir, tmp_path, s3_server):
    """Stages hand over through s3:// (moto on 127.0.0.1); MLflow's artifact URLs point into the bucket,
    and `farm promote` on a machine with an empty cache fetches and verifies the chosen model."""
    from mlflow.tracking import MlflowClient

    store = {"FARM_STORAGE": "s3://farm-e2e/farm", "FARM_STORAGE_OPTIONS": json.dumps(s3_server("farm-e2e"))}
    sweep = {"name": "via-s3", "base": {"model": str(tiny_model_dir)},
             "data": {"calib_tokens": 512, "eval_windows": 1, "eval_window_tokens": 32},
             "exports": [{"format": "gguf", "quant": "Q8_0"}],
             "targets": [{"name": "b", "labels": {"farm/node": "b"}}],
             "bench": {"prompt_tokens": 16, "decode_tokens": 8, "warmup": 0, "repeats": 1},
             "promote": {"model_name": "via-s3-llm"}}
    f = tmp_path / "via-s3.yaml"
    f.write_text(yaml.safe_dump(sweep))
    res = submit(cluster, f, **store)
    assert res.returncode == 0 and "2 cells finished, 0 failed" in res.stdout, res.stdout[-4000:]
    c = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("via-s3")
    cells = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'cell'")
    assert {r.data.tags["farm.artifact_uri"].split("/stages/")[0] for r in cells} == {"s3://farm-e2e/farm"}
    assert all("bench.json" in {a.path for a in c.list_artifacts(r.info.run_id)} for r in cells)
    # the manifests the driver was told of travel with the cell: promote fetches only those
    assert all(len(r.data.tags.get(t, "")) == 64 for r in cells for t in ("farm.export_manifest", "farm.artifact_manifest"))
    res = farm({**cluster, **store, "FARM_HOME": str(tmp_path / "elsewhere")}, "promote", "via-s3")
    assert res.returncode == 0, res.stdout + res.stderr
    version = c.get_model_version_by_alias("via-s3-llm", "champion")
    assert version.tags["farm.artifact_uri"].startswith("s3://farm-e2e/farm/stages/")


def test_a_failing_stage_and_one_over_its_memory_are_data(cluster, tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    sweep = {"name": "partly-broken", "base": {"model": str(tiny_model_dir)},
             "data": {"calib_tokens": 2048, "eval_windows": 1, "eval_window_tokens": 32},
             # a test-only method that raises (FARM_PLUGINS): every limit of a real one is caught at validation
             "pipelines": [[], [{"method": "fail_at_run_time", "message": "deliberately broken step"}],
                           # 64 x 1024 tokens through student and teacher: far over 2.5 GiB (batch 16: 2.8 GB)
                           [{"method": "lora", "rank": 2, "steps": 2, "batch": 64, "seq_len": 1024}]],
             "exports": [{"format": "gguf", "quant": "Q8_0"}],
             "targets": [{"name": "a", "labels": {"farm/node": "a"}}],
             "bench": {"prompt_tokens": 16, "decode_tokens": 8, "warmup": 0, "repeats": 1},
             "stage_memory_gb": 2.5}
    f = tmp_path / "partly.yaml"
    f.write_text(yaml.safe_dump(sweep))
    res = submit(cluster, f, FARM_PLUGINS="method:fail_at_run_time=tests.plugins.failing_method")
    assert res.returncode != 0  # the job says that cells failed (exit 3: a partial sweep) ...
    assert "2 cells finished, 2 failed" in res.stdout, res.stdout[-4000:]  # ... and the rest of the sweep finished
    assert "a partial sweep: `farm status partly-broken`" in res.stdout
    c = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("partly-broken")
    runs = {r.data.tags["farm.label"]: r for r in c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'cell'")}
    failed = runs["fail_at_run_time/gguf-Q8_0@a"]
    assert failed.info.status == "FAILED" and "deliberately broken step" in failed.data.tags["farm.error"]
    assert not failed.data.tags["farm.error"].startswith("ray::")  # the stage's own error, not Ray's wrapper
    assert "error.txt" in {a.path for a in c.list_artifacts(failed.info.run_id)}
    oom = runs["lora-r2/gguf-Q8_0@a"]
    assert oom.info.status == "FAILED" and "killed for memory" in oom.data.tags["farm.error"], oom.data.tags
    assert "stage_memory_gb" in oom.data.tags["farm.error"]
    ok = {k: r for k, r in runs.items() if k not in ("fail_at_run_time/gguf-Q8_0@a", "lora-r2/gguf-Q8_0@a")}
    assert len(ok) == 2 and all(r.info.status == "FINISHED" for r in ok.values())
    parent = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'sweep'")[0]
    assert parent.data.metrics["cells_failed"] == 2 and parent.info.status == "FINISHED"  # partial, not failed
    assert parent.data.tags["farm.outcome"].startswith("partial: 2 of 4 cells failed")


def _wait_for_cells(c, name, n, timeout=600):
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        exp = c.get_experiment_by_name(name)
        if exp and len(c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'cell'")) >= n:
            return
        time.sleep(2)
    raise AssertionError(f"fewer than {n} cells of {name} logged in {timeout} s")


def _slow_sweep(name, tiny_model_dir, window):
    return {"name": name, "base": {"model": str(tiny_model_dir)},
            "data": {"calib_tokens": 512, "eval_windows": 1, "eval_window_tokens": window},  # fresh stage ids
            "pipelines": [[], [{"method": "prune_layers", "drop": 1, "calib_samples": 2, "seq_len": 64}]],
            "exports": [{"format": "gguf", "quant": ["F16", "Q8_0", "Q4_0"]}],
            "targets": [{"name": "a", "labels": {"farm/node": "a"}}],
            "bench": {"prompt_tokens": 32, "decode_tokens": 32, "warmup": 1, "repeats": 3}}


def _submit_no_wait(env, sweep_file, submission_id):
    runtime_env = {"env_vars": {"FARM_HOME": env["FARM_HOME"], "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}}
    subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{PORTS['RAY_DASHBOARD_PORT']}",
                    "--submission-id", submission_id, "--no-wait", "--working-dir", str(ROOT),
                    "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "farm", "run",
                    str(sweep_file)], env=env, check=True, capture_output=True, timeout=120)


def _start(env, sweep: dict, tmp_path, submission_id: str, cells: int):
    """Write the sweep, submit it without waiting, return an MLflow client once `cells` cells landed."""
    from mlflow.tracking import MlflowClient

    f = tmp_path / f"{sweep['name']}.yaml"
    f.write_text(yaml.safe_dump(sweep))
    _submit_no_wait(env, f, submission_id)
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    _wait_for_cells(c, sweep["name"], cells)
    return c, f


def _wait_running(env, submission_id, timeout=300):
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        out = _ray_job(env, "status", submission_id, timeout=60).stdout
        if "RUNNING" in out or "SUCCEEDED" in out:
            return
        assert "FAILED" not in out and "STOPPED" not in out, out[-2000:]
        time.sleep(2)
    raise AssertionError(f"job {submission_id} did not start in {timeout} s")


def _ray_job(env, *args, timeout=900):
    return subprocess.run([str(VENV_BIN / "ray"), "job", *args, "--address",
                           f"http://127.0.0.1:{PORTS['RAY_DASHBOARD_PORT']}"], check=False, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_mlflow_restart_mid_sweep_loses_nothing(cluster, tiny_model_dir, tmp_path):
    import signal
    import time

    c, _ = _start(cluster, _slow_sweep("outage", tiny_model_dir, 40), tmp_path, "farm-e2e-outage", 1)
    pid = int((Path(cluster["FARM_HOME"]) / "run" / "mlflow.pid").read_text())
    os.killpg(pid, signal.SIGTERM)  # the tracking server goes away mid-sweep ...
    time.sleep(float(os.environ.get("FARM_E2E_OUTAGE_S", "10")))  # longer in the fault report (README)
    subprocess.run([str(ROOT / "clusters/local/up.sh")], env=cluster, check=True, timeout=300)  # ... and returns
    logs = _ray_job(cluster, "logs", "--follow", "farm-e2e-outage", timeout=1800)
    assert "7 cells finished, 0 failed" in logs.stdout, logs.stdout[-3000:]
    exp = c.get_experiment_by_name("outage")
    cells = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'cell'")
    assert len(cells) == 7 and all(r.info.status == "FINISHED" for r in cells)  # none lost, none doubled
    assert all(set(METRIC_NAMES) <= set(r.data.metrics) for r in cells)


def test_stopped_driver_resubmitted_reuses_finished_stages(cluster, tiny_model_dir, tmp_path):
    c, f = _start(cluster, _slow_sweep("resume", tiny_model_dir, 36), tmp_path, "farm-e2e-resume-1", 2)
    _ray_job(cluster, "stop", "farm-e2e-resume-1", timeout=120)
    exp = c.get_experiment_by_name("resume")
    [first] = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'sweep'")
    assert first.info.status == "KILLED" and "signal" in first.data.tags["farm.stopped"]
    done_before = [r for r in c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'cell'")
                   if r.info.status == "FINISHED"]
    res = submit(cluster, f)
    assert res.returncode == 0 and "7 cells finished, 0 failed" in res.stdout
    second = [r for r in c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'sweep'")
              if r.info.run_id != first.info.run_id]
    assert len(second) == 1 and second[0].info.status == "FINISHED"
    cells = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{second[0].info.run_id}'")
    assert len(cells) == 7
    reused = {r.data.tags["farm.cell_id"] for r in cells if r.data.tags["farm.cached.bench"] == "true"}
    assert {r.data.tags["farm.cell_id"] for r in done_before} <= reused  # nothing finished was measured again


def test_a_node_dies_mid_sweep(cluster, tiny_model_dir, tmp_path):
    """Node b is killed (SIGKILL to its raylet and workers) after the first cell lands. Work that node a
    can do is retried there; benchmarks that must run on b fail with the reason; nothing hangs."""
    import signal

    sweep = _slow_sweep("node-loss", tiny_model_dir, 44)
    sweep["pipelines"] = [[]]
    sweep["targets"] = [{"name": "anywhere", "labels": {}}, {"name": "on-b", "labels": {"farm/node": "b"}}]
    pid_file = Path(cluster["FARM_HOME"]) / "run" / "node-b.pid"
    try:
        c, _ = _start(cluster, sweep, tmp_path, "farm-e2e-node-loss", 1)
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        logs = _ray_job(cluster, "logs", "--follow", "farm-e2e-node-loss")
        exp = c.get_experiment_by_name("node-loss")
        cells = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'cell'")
        assert len(cells) == 8, logs.stdout[-3000:]  # every cell accounted for
        for r in cells:
            if r.data.params["target.name"] == "anywhere":
                assert r.info.status == "FINISHED"
            elif r.info.status == "FAILED":
                assert "lost every node" in r.data.tags["farm.error"]
            else:
                assert r.data.tags["farm.node.farm/node"] == "b"  # finished on b before it died
        assert any(r.info.status == "FAILED" for r in cells)
    finally:
        pid_file.unlink(missing_ok=True)
        subprocess.run([str(ROOT / "clusters/local/add-node.sh"), "b", "1"], env=cluster, check=True, timeout=120)




def test_two_sweeps_at_once_through_a_lost_node_and_an_mlflow_restart(cluster, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    """The soak: two sweeps sharing their base stages are submitted at once; when the first cell lands, node b
    is killed (SIGKILL to its raylet and workers) and the MLflow server is stopped and started again. Every
    cell of both sweeps is accounted for once, both finish, and the ledger of stage runs shows that no stage
    was run again after it had finished (concurrent runs of a shared stage, before either published, are not
    reruns)."""
    import signal
    import time

    from farm.stages import runner as stages

    t0 = time.time()
    a = _slow_sweep("soak-a", tiny_model_dir, 48)
    a["pipelines"] = [[]]
    b = _slow_sweep("soak-b", tiny_model_dir, 48)  # same base, data and exports: shares a's stages
    b["exports"] = [{"format": "gguf", "quant": ["F16", "Q4_0"]}]
    for s in (a, b):
        s["targets"] = [{"name": "anywhere", "labels": {}}]
    home = Path(cluster["FARM_HOME"])
    pid_file = home / "run" / "node-b.pid"
    try:
        for s in (a, b):
            f = tmp_path / f"{s['name']}.yaml"
            f.write_text(yaml.safe_dump(s))
            _submit_no_wait(cluster, f, f"farm-e2e-{s['name']}")
            # the next one once this one's driver runs: Ray unpacks a working_dir both jobs share without a lock
            # (ray-project/ray#47471 is that race's upload side); submitted together, one job once started from
            # a half-unpacked copy ("No module named farm.sweep.checks"). Both sweeps still run at once.
            _wait_running(cluster, f"farm-e2e-{s['name']}")
        from mlflow.tracking import MlflowClient

        c = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
        _wait_for_cells(c, "soak-a", 1)
        os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # a node is lost ...
        os.killpg(int((home / "run" / "mlflow.pid").read_text()), signal.SIGTERM)  # ... and the tracking server
        time.sleep(5)
        subprocess.run([str(ROOT / "clusters/local/up.sh")], env=cluster, check=True, timeout=300)
        logs = {s["name"]: _ray_job(cluster, "logs", "--follow", f"farm-e2e-{s['name']}", timeout=1800).stdout
                for s in (a, b)}
        for name, n in (("soak-a", 4), ("soak-b", 5)):  # each with its PyTorch baseline cell
            assert f"{n} cells finished, 0 failed" in logs[name], logs[name][-3000:]
            exp = c.get_experiment_by_name(name)
            parents = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'sweep'")
            assert [p.info.status for p in parents] == ["FINISHED"]
            cells = c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'cell'")
            ids = [r.data.tags["farm.cell_id"] for r in cells]
            assert len(ids) == n and len(set(ids)) == n, ids  # none lost, none doubled
            assert all(r.info.status == "FINISHED" and set(METRIC_NAMES) <= set(r.data.metrics) for r in cells)
        monkeypatch.setenv("FARM_HOME", cluster["FARM_HOME"])  # the cluster's ledger, not this process's
        ran = stages.ledger(since=t0)
        # (the base stage is the module's other sweeps' too: stored before, reused, not run here)
        assert {e["kind"] for e in ran} >= {"reference", "export", "evaluate", "bench"}
        assert stages.reruns(ran) == [], stages.reruns(ran)  # nothing finished was run again
        assert not list((home / "outbox").rglob("*.json"))  # nothing left waiting for MLflow
    finally:
        pid_file.unlink(missing_ok=True)
        subprocess.run([str(ROOT / "clusters/local/add-node.sh"), "b", "1"], env=cluster, check=True, timeout=120)
