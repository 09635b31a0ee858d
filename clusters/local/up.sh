#!/usr/bin/env bash
# Start a local farm: a Ray head node labelled with this machine's CPU facts (one bench slot) and an
# MLflow tracking server (sqlite + local artifact store), both bound to 127.0.0.1. Idempotent.
#   env: FARM_HOME (default ./.farm)  RAY_PORT (6379)  RAY_DASHBOARD_PORT (8265)  MLFLOW_PORT (5000)
#        FARM_PORT_BASE: if set, every other Ray port is taken from FARM_PORT_BASE.. (a second cluster)
#        FARM_HEAD_CPUS (all)  FARM_HEAD_CPUSET (e.g. "0": pin the head and its workers to these cores)
#        FARM_EXTRA_LABELS: more node labels, "key=value ..."
#        FARM_JOINABLE=1: other raylets may join (add-node.sh, the tests' two-raylet cluster). Ray then
#          listens on this machine's network address too (Ray 2.60 rewrites a 127.0.0.1 node address
#          into it), with token authentication; without it every Ray listener is bound to 127.0.0.1.
#        FARM_AUTOSCALING_CONFIG: an autoscaler config (available_node_types), passed to `ray start`
#          (e.g. Ray's fake_multinode provider with RAY_FAKE_CLUSTER=1) and read by the sweep driver
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export PATH="$ROOT/.venv/bin:$PATH"
export FARM_HOME=${FARM_HOME:-$ROOT/.farm}
RAY_PORT=${RAY_PORT:-6379}
DASH_PORT=${RAY_DASHBOARD_PORT:-8265}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
RUN="$FARM_HOME/run"
mkdir -p "$RUN" "$FARM_HOME/mlflow/artifacts"
# Ray token authentication on. `ray start --head` does not create a token: on a machine that never ran
# Ray it fails ("no authentication token was found"), so make one here, readable by this user only, where
# every Ray command looks (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token): `ray job submit`, `farm submit`,
# the dashboard, the tasks.
# A task the memory monitor kills is retried once, then fails (bounded: Ray has its own OOM-retry policy).
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false RAY_task_oom_retries=1
# A one-machine farm: Ray's single-machine mode, in which the node's address is 127.0.0.1 and every gRPC
# server, agent and the client server bind to it (Ray's switch for laptops; it refuses other raylets).
[ "${FARM_JOINABLE:-0}" = 1 ] || export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
"$ROOT/clusters/local/token.sh"

up() {
  local token=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
  # the header goes to curl on its stdin (printf is a shell builtin): never on a command line, where ps shows it
  if [ -f "$token" ]; then
    printf 'header = "Authorization: Bearer %s"\n' "$(<"$token")" | curl -sf -o /dev/null -K - "$1"
  else
    curl -sf -o /dev/null "$1"
  fi
}

if ! up "http://127.0.0.1:$MLFLOW_PORT/health"; then
  # --workers 1 and no job execution: ~0.5 GB instead of ~2.4 GB on a small machine
  setsid nohup mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$FARM_HOME/mlflow/mlflow.db" \
    --serve-artifacts --artifacts-destination "$FARM_HOME/mlflow/artifacts" \
    >"$RUN/mlflow.log" 2>&1 </dev/null &
  echo $! >"$RUN/mlflow.pid"
fi

if ! up "http://127.0.0.1:$DASH_PORT/api/version"; then
  extra=()
  if [ -n "${FARM_PORT_BASE:-}" ]; then
    b=$FARM_PORT_BASE
    extra=(--ray-client-server-port $((b + 1)) --object-manager-port $((b + 2)) --node-manager-port $((b + 3))
           --dashboard-agent-listen-port $((b + 4)) --dashboard-agent-grpc-port $((b + 5))
           --runtime-env-agent-port $((b + 6)) --metrics-export-port $((b + 7))
           --min-worker-port $((b + 100)) --max-worker-port $((b + 199)) --temp-dir "/tmp/farm-ray-$RAY_PORT")
    echo "/tmp/farm-ray-$RAY_PORT" >"$RUN/ray-temp-dir"  # short: Ray's socket paths must fit 107 bytes
  fi
  [ -n "${FARM_AUTOSCALING_CONFIG:-}" ] && extra+=(--autoscaling-config "$FARM_AUTOSCALING_CONFIG")
  pin=()
  [ -n "${FARM_HEAD_CPUSET:-}" ] && pin=(taskset -c "$FARM_HEAD_CPUSET")
  # FARM_HOME travels to every task through the node's environment (storage is a local path here).
  setsid nohup "${pin[@]}" ray start --head --block --disable-usage-stats --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --num-cpus "${FARM_HEAD_CPUS:-$(nproc)}" \
    --resources '{"bench_slot": 1}' --labels "$(farm labels ${FARM_EXTRA_LABELS:-})" "${extra[@]}" \
    >"$RUN/ray.log" 2>&1 </dev/null &
  echo $! >"$RUN/ray.pid"
  [ "${FARM_JOINABLE:-0}" = 1 ] && echo joinable >"$RUN/ray-mode" || echo loopback >"$RUN/ray-mode"
fi

for i in $(seq 1 120); do
  if up "http://127.0.0.1:$MLFLOW_PORT/health" && up "http://127.0.0.1:$DASH_PORT/api/version"; then
    echo "farm: Ray dashboard http://127.0.0.1:$DASH_PORT  MLflow http://127.0.0.1:$MLFLOW_PORT  (FARM_HOME=$FARM_HOME)"
    exit 0
  fi
  for svc in mlflow ray; do
    if [ -f "$RUN/$svc.pid" ] && ! kill -0 "$(cat "$RUN/$svc.pid")" 2>/dev/null; then
      echo "farm: $svc failed to start; its log:" >&2; tail -30 "$RUN/$svc.log" >&2; exit 1
    fi
  done
  sleep 1
done
echo "farm: services did not come up within 120 s; logs in $RUN" >&2
exit 1
