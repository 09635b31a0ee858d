#!/usr/bin/env bash
# Makespan of a sweep on one node with every CPU vs on the local two-node cluster (the same CPUs split
# into two pinned raylets), each from empty stage storage; then the cell -> node placement table read
# back from MLflow. Usage: [MODES="one-node two-nodes"] benchmarks/makespan.sh [jobs/demo.yaml]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SWEEP=${1:-jobs/demo.yaml}
export PATH="$ROOT/.venv/bin:$PATH" RAY_AUTH_MODE=token
SHARED=${FARM_HOME:-$ROOT/.farm}
out=$(mktemp -d /tmp/farm-makespan.XXXX)

run() {  # name, then the commands that bring the cluster up
  local name=$1; shift
  export FARM_HOME="$out/$name"
  mkdir -p "$FARM_HOME"
  ln -s "$SHARED/models" "$FARM_HOME/models"; ln -s "$SHARED/tools" "$FARM_HOME/tools"  # caches, not stages
  "$@"
  local t0=$(date +%s)
  ray job submit --address http://127.0.0.1:8265 --working-dir "$ROOT" \
    --runtime-env-json "{\"env_vars\": {\"FARM_HOME\": \"$FARM_HOME\", \"MLFLOW_TRACKING_URI\": \"http://127.0.0.1:5000\"}}" \
    -- python -m farm run "$SWEEP" > "$out/$name.log" 2>&1 || true
  echo "$name: makespan $(( $(date +%s) - t0 )) s ($(grep -o '[0-9]* cells finished, [0-9]* failed' "$out/$name.log"))"
  MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python - "$SWEEP" <<'PY'
import sys, yaml
from mlflow.tracking import MlflowClient
name = yaml.safe_load(open(sys.argv[1]))["name"]
c = MlflowClient("http://127.0.0.1:5000")
exp = c.get_experiment_by_name(name)
for r in sorted(c.search_runs([exp.experiment_id], "tags.`farm.kind` = 'cell'"), key=lambda r: r.data.tags["farm.label"]):
    t = r.data.tags
    print(f"  {t['farm.label']:42s} node {t['farm.node_id'][:8]} farm/node={t.get('farm.node.farm/node', '-'):2s}"
          f" threads {t['farm.bench.threads']}  decode {r.data.metrics['decode_tok_s']:6.1f} tok/s"
          f"  contaminated={t['farm.bench.contaminated']}")
PY
  "$ROOT/clusters/local/down.sh" > /dev/null
}
trap '"$ROOT/clusters/local/down.sh" > /dev/null 2>&1' EXIT

for mode in ${MODES:-one-node two-nodes}; do
  case $mode in
    one-node) run one-node "$ROOT/clusters/local/up.sh" ;;
    two-nodes) run two-nodes bash -c "FARM_JOINABLE=1 FARM_HEAD_CPUS=1 FARM_HEAD_CPUSET=0 FARM_EXTRA_LABELS=farm/node=a \
                 '$ROOT/clusters/local/up.sh' && '$ROOT/clusters/local/add-node.sh' b 1" ;;
  esac
done
echo "logs: $out"
