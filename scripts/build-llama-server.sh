#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (continuous batching, --parallel slots, prompt cache, /metrics) from the
# llama.cpp inside the pinned llama-cpp-python sdist — the code the farm converts, evaluates and benchmarks
# GGUFs with — with the same flags and the same AMX fix (scripts/llama-cpp-source.sh). llama-cpp-python's own
# `llama_cpp.server` serialises requests behind one lock, so it cannot be a serving benchmark.
# Built once per version and flag set (~12 min on 2 cores) into $FARM_WHEEL_CACHE (default: farm-wheels/ in
# pip's cache directory), where the next clone finds it:
#   llama-server-VERSION-KEY/llama-server, lib*.so       (RPATH $ORIGIN)
#   llama-server-VERSION-KEY/variants/libggml-cpu-*.so   (one per ISA level; farm/serve/llamacpp_server.py
#                                                          hands the chosen one over in GGML_BACKEND_PATH)
# and links it as .venv/llama-server (what farm.serve.llamacpp_server looks for).
#   usage: scripts/build-llama-server.sh PIP      (the pip of the virtualenv the farm runs in)
set -euo pipefail
PIP=$1
source "$(dirname "$0")/llama-cpp-source.sh"
SERVER_FLAGS="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON
 -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF
 -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON"
cache_root=${FARM_WHEEL_CACHE:-$("$PIP" cache dir 2>/dev/null || echo "$HOME/.cache/pip")/farm-wheels}
key=$(printf '%s %s' "$KEY" "$SERVER_FLAGS" | sha256sum | cut -c1-12)
cache="$cache_root/llama-server-$VERSION-$key"
venv=$(cd "$(dirname "$PIP")/.." && pwd)
if [ ! -x "$cache/llama-server" ]; then
  command -v cmake >/dev/null || "$PIP" install -q cmake ninja  # Debian's cmake when present, else PyPI's
  export PATH="$venv/bin:$PATH"
  echo "farm: building llama.cpp's llama-server ($VERSION) for every CPU variant (once; ~12 min on 2 cores) into $cache"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  src=$(llama_cpp_source "$work")
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  # shellcheck disable=SC2086
  cmake -S "$src/vendor/llama.cpp" -B "$work/build" "${gen[@]}" $FLAGS $SERVER_FLAGS '-DCMAKE_INSTALL_RPATH=$ORIGIN' \
    -Wno-dev >"$work/configure.log" 2>&1 || { tail -30 "$work/configure.log" >&2; exit 1; }
  cmake --build "$work/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; exit 1; }
  out="$work/out"; mkdir -p "$out/variants"
  cp -a "$work/build/bin/llama-server" "$work"/build/bin/lib*.so* "$out/"
  mv "$out"/libggml-cpu-*.so "$out/variants/"
  "$out/llama-server" --version >/dev/null 2>&1 || { echo "farm: the llama-server just built does not start" >&2; exit 1; }
  mkdir -p "$cache_root"
  mv "$out" "$cache.partial.$$" && mv -T "$cache.partial.$$" "$cache"  # whole, or not at all
fi
ln -sfn "$cache/llama-server" "$venv/llama-server"
