"""The one-machine farm as `make demo` starts it (clusters/local/up.sh without FARM_JOINABLE: Ray's
single-machine mode), here with Ray's fake multi-node autoscaler behind it (clusters/local/fake-autoscale.yaml):
a sweep whose only target is a node type with `min_workers: 0` gets its node and finishes on it, and every
socket the cluster's processes listen on (MLflow, GCS, raylets, agents, dashboard, workers, the autoscaled
node) is bound to loopback. Ports of its own, so a running `make demo` or e2e cluster is left alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PORTS = {"RAY_PORT": "26379", "RAY_DASHBOARD_PORT": "28265", "MLFLOW_PORT": "25000", "FARM_PORT_BASE": "26400"}
HEAD_ID = "f" * 51 + "00000"  # the fake provider's id for the head node (RAY_CLOUD_INSTANCE_ID)


@pytest.fixture(scope="module")
def autoscaled(tmp_path_factory):
    home = tmp_path_factory.mktemp("farm-autoscaled")
    config = yaml.safe_load((ROOT / "clusters/local/fake-autoscale.yaml").read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{PORTS['RAY_PORT']}"
    assert config["provider"]["head_node_id"] == HEAD_ID
    (home / "autoscale.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, **PORTS, "FARM_HOME": str(home), "FARM_HEAD_CPUS": "1",
           "FARM_AUTOSCALING_CONFIG": str(home / "autoscale.yaml"), "RAY_FAKE_CLUSTER": "1",
           "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": HEAD_ID, "RAY_NODE_TYPE_NAME": "ray.head.default",
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{PORTS['MLFLOW_PORT']}",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    for k in ("FARM_STORAGE", "FARM_JOINABLE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(k, None)
    try:
        subprocess.run([str(ROOT / "clusters/local/up.sh")], env=env, check=True, timeout=300)
        yield env
    finally:
        subprocess.run([str(ROOT / "clusters/local/down.sh")], check=False, env=env, timeout=120)


def test_a_sweep_on_a_node_type_with_no_node_up_gets_its_node_and_finishes(autoscaled, tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    sweep = {"name": "autoscaled", "base": {"model": str(tiny_model_dir)},
             "data": {"calib_tokens": 512, "eval_windows": 1, "eval_window_tokens": 32},
             "exports": [{"format": "gguf", "quant": ["F16", "Q8_0"]}],
             "targets": [{"name": "scaled", "labels": {"farm/node": "autoscaled"}}],  # only the node type has it
             "bench": {"prompt_tokens": 16, "decode_tokens": 8, "warmup": 0, "repeats": 1}}
    f = tmp_path / "autoscaled.yaml"
    f.write_text(yaml.safe_dump(sweep))
    res = subprocess.run([str(VENV_BIN / "farm"), "submit", str(f)], check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=1200,
                         env={**autoscaled, "RAY_ADDRESS": f"http://127.0.0.1:{PORTS['RAY_DASHBOARD_PORT']}"})
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "target 'scaled': no node is up yet; asked the autoscaler for one of type bench-fake" in out
    assert re.search(r"autoscaled node\(s\) up for scaled after \d+ s", out), out[-4000:]
    c = MlflowClient(autoscaled["MLFLOW_TRACKING_URI"])
    cells = c.search_runs([c.get_experiment_by_name("autoscaled").experiment_id], "tags.`farm.kind` = 'cell'")
    assert len(cells) == 3 and all(r.info.status == "FINISHED" for r in cells)  # torch baseline + two GGUFs
    assert {r.data.tags["farm.node.farm/node"] for r in cells} == {"autoscaled"}
    assert {r.data.tags["farm.node_id"] for r in cells} != {HEAD_ID}  # measured on the started node


def _session_pids(*leaders: int) -> set[int]:
    """Every process in the sessions these leaders started (up.sh starts Ray and MLflow with setsid)."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], check=True, capture_output=True, text=True).stdout
    return {int(pid) for pid, sid in (line.split() for line in ps.splitlines()) if int(sid) in leaders}


def test_every_listener_of_the_one_machine_farm_is_on_loopback(autoscaled):
    run = Path(autoscaled["FARM_HOME"]) / "run"
    assert (run / "ray-mode").read_text().strip() == "loopback"
    pids = _session_pids(int((run / "ray.pid").read_text()), int((run / "mlflow.pid").read_text()))
    ss = subprocess.run(["ss", "-H", "-l", "-t", "-u", "-n", "-p"], check=True, capture_output=True, text=True).stdout
    listeners = []  # (local address, process name, pid) of the cluster's processes
    for line in ss.splitlines():
        fields = line.split()
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in pids:
                listeners.append((fields[4], name, int(pid)))
    names = {name for _, name, _ in listeners}
    ports = {addr.rsplit(":", 1)[1] for addr, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names and {PORTS["RAY_PORT"], PORTS["MLFLOW_PORT"]} <= ports, listeners
    exposed = [lst for lst in listeners if lst[0].rsplit(":", 1)[0] not in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]")]
    assert not exposed, f"listening beyond loopback: {exposed}"
