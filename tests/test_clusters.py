"""The cluster definitions in clusters/ agree with what the farm schedules on."""

import re
from pathlib import Path

import yaml

from farm import nodes
from farm.sweep.sections import LABEL_KEY

ROOT = Path(__file__).resolve().parents[1]
FARM_KEYS = set(nodes.labels({"vendor": "intel", "model_name": "x", "family": "icelake", "isa": "avx2", "cores": 1,
                              "memory_gb": 1, "numa_nodes": 1}))


def check_labels(labels: dict):
    for k, v in labels.items():
        assert re.match(LABEL_KEY, k) and k in FARM_KEYS, k
        assert re.match(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$", v), v


def test_aws_bench_node_types_have_a_slot_and_valid_labels():
    cfg = yaml.safe_load((ROOT / "clusters/aws/farm.yaml").read_text())
    types = cfg["available_node_types"]
    bench = {n: t for n, t in types.items() if t["resources"].get("bench_slot")}
    assert set(bench) == {"spr", "icl"} and types["head"]["resources"] == {"CPU": 0}
    for t in bench.values():
        assert t["resources"]["bench_slot"] == 1
        check_labels(t["labels"])
    start = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host 127.0.0.1" in start and "farm labels" in start


def test_kuberay_worker_groups_per_cpu_family():
    cfg = yaml.safe_load((ROOT / "clusters/kuberay/raycluster.yaml").read_text())
    groups = {g["groupName"]: g for g in cfg["spec"]["workerGroupSpecs"]}
    assert {"sapphire-rapids", "icelake"} <= set(groups)
    for name in ("sapphire-rapids", "icelake"):
        assert groups[name]["resources"] == {"bench_slot": "1"}
        check_labels(groups[name]["labels"])
        assert groups[name]["labels"]["farm/cpu-family"] == name


def test_a_machine_that_never_ran_ray_gets_a_private_token(tmp_path):
    """`ray start --head` with token auth fails without a token; the local scripts make one (0600) where
    every Ray command looks, and keep it on later runs."""
    import os
    import stat
    import subprocess

    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    script = str(ROOT / "clusters/local/token.sh")
    first = subprocess.run([script], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    token = tmp_path / ".ray" / "auth_token"
    assert token.stat().st_size >= 16 and stat.S_IMODE(token.stat().st_mode) == 0o600
    before = token.read_text()
    assert subprocess.run([script], check=False, env=env, timeout=120).returncode == 0 and token.read_text() == before
    custom = tmp_path / "elsewhere" / "token"
    res = subprocess.run([script], check=False, env={**env, "RAY_AUTH_TOKEN_PATH": str(custom)}, capture_output=True,
                         timeout=120)
    assert res.returncode == 0 and stat.S_IMODE(custom.stat().st_mode) == 0o600 and custom.read_text() != before
