#!/usr/bin/env bash
# Add a worker node to the local cluster started by up.sh: a second raylet on this machine with its
# own CPU share (pinned with taskset), its own bench slot and its own labels — a stand-in for another
# machine, for tests and demos of label placement.
#   usage: add-node.sh NAME CPUSET [key=value ...]      e.g. add-node.sh b 1 farm/tier=icelake
#   env: FARM_HOME, RAY_PORT (6379), FARM_PORT_BASE (as for up.sh; this node takes ports +20..)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export PATH="$ROOT/.venv/bin:$PATH"
export FARM_HOME=${FARM_HOME:-$ROOT/.farm}
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 RAY_task_oom_retries=1
NAME=$1; CPUSET=$2; shift 2
RAY_PORT=${RAY_PORT:-6379}
RUN="$FARM_HOME/run"
mkdir -p "$RUN"
if [ "$(cat "$RUN/ray-mode" 2>/dev/null)" = loopback ]; then
  echo "farm: the local head runs in Ray's one-machine mode (every listener on 127.0.0.1), which takes no other" \
    "raylets; restart it joinable: clusters/local/down.sh; FARM_JOINABLE=1 clusters/local/up.sh" >&2
  exit 2
fi
ncpus=$(taskset -c "$CPUSET" nproc)
n=$(find "$RUN" -maxdepth 1 -name "node-*.pid" | wc -l)
b=$(( ${FARM_PORT_BASE:-17400} + 20 * n + 20 ))
# Its own temp dir: Ray unpacks a job's working_dir into <temp dir>/session_*/runtime_resources, and a node's
# runtime-env agent that first sees a package removes and re-unpacks that directory (overwrite=True). Two raylets
# sharing one temp dir then pull the code from under each other's running driver and workers
# (ModuleNotFoundError: farm.run.progress, seen under load); separate machines never share it.
TMPD="/tmp/farm-ray-$RAY_PORT-$NAME"  # short: Ray's socket paths must fit 107 bytes
echo "$TMPD" >>"$RUN/ray-temp-dir"
setsid nohup taskset -c "$CPUSET" ray start --block --disable-usage-stats --address "127.0.0.1:$RAY_PORT" \
  --node-ip-address 127.0.0.1 --num-cpus "$ncpus" --resources '{"bench_slot": 1}' \
  --labels "$(farm labels "farm/node=$NAME" "$@")" \
  --object-manager-port $((b + 2)) --node-manager-port $((b + 3)) --dashboard-agent-listen-port $((b + 4)) \
  --dashboard-agent-grpc-port $((b + 5)) --runtime-env-agent-port $((b + 6)) --metrics-export-port $((b + 7)) \
  --min-worker-port $((b + 8)) --max-worker-port $((b + 19)) --temp-dir "$TMPD" \
  >"$RUN/node-$NAME.log" 2>&1 </dev/null &
echo $! >"$RUN/node-$NAME.pid"
for i in $(seq 1 60); do
  if grep -q "Ray runtime started" "$RUN/node-$NAME.log" 2>/dev/null; then
    echo "farm: node $NAME joined (cpus $CPUSET, labels farm/node=$NAME $*)"; exit 0
  fi
  kill -0 "$(cat "$RUN/node-$NAME.pid")" 2>/dev/null || { tail -20 "$RUN/node-$NAME.log" >&2; exit 1; }
  sleep 1
done
echo "farm: node $NAME did not join in 60 s; see $RUN/node-$NAME.log" >&2; exit 1
