#!/usr/bin/env bash
# A PNG of what a user sees in a browser: headless Chromium (Debian's `chromium` package), e.g.
#   scripts/screenshot.sh reports/demo/report.html docs/report-demo.png 1400 3000
#   scripts/screenshot.sh "http://127.0.0.1:5000/#/experiments/1" docs/mlflow-demo.png 1600 1000
# A URL gets a few seconds of virtual time so that a JavaScript app (MLflow's UI) has rendered.
set -euo pipefail
src=$1 out=$2 width=${3:-1400} height=${4:-2000}
command -v chromium >/dev/null || { echo "screenshot: needs Chromium (apt-get install chromium)" >&2; exit 2; }
case $src in http*) url=$src ;; *) url="file://$(realpath "$src")" ;; esac
mkdir -p "$(dirname "$out")"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=15000 \
  --window-size="$width,$height" --screenshot="$(realpath -m "$out")" "$url" 2>/dev/null
test -s "$out" && echo "screenshot: $out"
