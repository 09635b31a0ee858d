"""The cluster simulation (benchmarks/simcluster.py) at a size the suite affords: the real driver, grid, storage,
ledger and an MLflow server over 13 Ray nodes of three CPU kinds, each stage's work replaced by a sleep."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def test_a_simulated_sweep_over_three_cpu_kinds_logs_each_cell_once_and_benches_own_their_nodes():
    done = subprocess.run([sys.executable, "benchmarks/simcluster.py", "--one", "--cells", "96", "--scale", "0.01"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["exit_code"] == 0 and r["cells"] == 96 + 3 and r["nodes"] == 13  # and a PyTorch baseline per target
    assert r["cell_runs"] == r["cell_runs_distinct"] == r["cells"]  # every cell exactly once in MLflow
    assert r["stages_run"] == r["stages"] and r["reruns_after_publishing"] == 0  # every stage once, none again
    # a bench or roofline had its node to itself, on its target's CPU kind (from the ledger's node labels)
    x = r["exclusivity"]
    assert x["node_owning_stages"] == 2 * r["cells"] and x["shared_with_another_stage"] == 0 and x["on_another_cpu_kind"] == 0
    assert r["mlflow"]["per_cell"] > 0 and r["driver_cpu_ms_per_stage"] > 0
