#!/usr/bin/env bash
# Stop what clusters/local/up.sh started (only those processes: other Ray clusters are left alone).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUN="${FARM_HOME:-$ROOT/.farm}/run"
for f in "$RUN"/node-*.pid "$RUN/ray.pid" "$RUN/mlflow.pid"; do
  svc=$(basename "$f" .pid)
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for i in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$f"
  echo "farm: stopped $svc"
done
rm -f "$RUN/ray-mode"
if [ -f "$RUN/ray-temp-dir" ]; then  # the head's and each added node's (add-node.sh), one per line
  while IFS= read -r d; do [ -n "$d" ] && rm -rf "$d"; done <"$RUN/ray-temp-dir"
  rm -f "$RUN/ray-temp-dir"
fi
