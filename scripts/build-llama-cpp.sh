#!/usr/bin/env bash
# Install llama-cpp-python built for every CPU the farm tags, the way llama.cpp's own releases are built
# for mixed fleets: GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS (one CPU backend library per x86 ISA level,
# x64 ... zen4, sapphirerapids; farm/runtimes/ggml_cpu.py picks one at run time), GGML_NATIVE off, so a
# wheel built on one CPU kind runs on every other (a native build made on an AMX Xeon dies with SIGILL on
# an older CPU, and pip's own wheel cache does not key on CMAKE_ARGS, so it would hand that wheel back).
# The wheel is built once per version and flag set (~10 min on 2 cores) and kept outside the clone, in
# $FARM_WHEEL_CACHE (default: farm-wheels/ in pip's cache directory), where the next clone finds it.
#   usage: scripts/build-llama-cpp.sh PIP      (the pip of the virtualenv to install into)
set -euo pipefail
PIP=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=$(sed -n 's/^llama[-_]cpp[-_]python==//Ip' "$ROOT/requirements.lock")
# LLAVA_BUILD off: farm runs no multimodal models; CMAKE_INSTALL_BINDIR: the variant libraries (installed
# to bin/ by ggml) go beside libllama.so in the package, where ggml_cpu.py looks for them.
FLAGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DLLAVA_BUILD=OFF"
# One fix to llama.cpp's AMX code (ggml-cpu/amx/mmq.cpp, ggml_tile_config_init): GCC 12's _tile_loadconfig()
# declares that ldtilecfg reads 8 bytes of the 64-byte tile configuration, so GCC drops the stores that
# set the tile shapes: `objdump -d libggml-cpu-sapphirerapids.so` shows ldtilecfg of a zeroed config with
# only palette 1 set, and every AMX matmul of more than one row then runs on unconfigured tiles. Handing
# the whole struct to ldtilecfg keeps the stores. (AMX stays off by default; `amx: true` measures it.)
AMX_FROM='_tile_loadconfig(&tc);'
AMX_TO='__asm__ volatile("ldtilecfg %0" :: "m"(tc));'
cache_root=${FARM_WHEEL_CACHE:-$("$PIP" cache dir 2>/dev/null || echo "$HOME/.cache/pip")/farm-wheels}
key=$(printf '%s %s %s %s' "$VERSION" "$FLAGS" "$AMX_TO" "$(uname -m)" | sha256sum | cut -c1-12)
cache="$cache_root/llama-cpp-python-$VERSION-$key"
site=$("$PIP" show llama-cpp-python 2>/dev/null | sed -n 's/^Location: //p' || true)  # empty: not installed
if [ -n "$site" ] && [ "$(cat "$site/llama_cpp/lib/farm-build-key" 2>/dev/null)" = "$key" ]; then
  exit 0  # this very build is installed
fi
if ! ls "$cache"/*.whl >/dev/null 2>&1; then
  echo "farm: building llama-cpp-python $VERSION for every CPU variant (once; ~10 min on 2 cores) into $cache"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PIP" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work/sdist"
  # the sdist's code is compiled and run: it must be the pinned one
  (cd "$work/sdist" && grep -F "llama_cpp_python-$VERSION.tar.gz" "$ROOT/farm/export/llama_cpp_sdist.sha256" | sha256sum -c --quiet) \
    || { echo "farm: llama-cpp-python $VERSION sdist does not match farm/export/llama_cpp_sdist.sha256" >&2; exit 1; }
  tar -xzf "$work"/sdist/*.tar.gz -C "$work"
  mmq=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp)
  grep -qF "$AMX_FROM" "$mmq" || { echo "farm: $mmq changed upstream; review the AMX fix in $0" >&2; exit 1; }
  python3 -c 'import sys; p, a, b = sys.argv[1:]; s = open(p).read(); open(p, "w").write(s.replace(a, b))' \
    "$mmq" "$AMX_FROM" "$AMX_TO"
  grep -qF "$AMX_TO" "$mmq"
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PIP" wheel -q --no-deps -w "$work/wheel" "$work"/llama_cpp_python-*/
  mkdir -p "$cache_root"
  mv "$work/wheel" "$cache.partial.$$" && mv -T "$cache.partial.$$" "$cache"  # whole, or not at all
fi
"$PIP" install -q --no-deps --force-reinstall "$cache"/*.whl
site=$("$PIP" show llama-cpp-python | sed -n 's/^Location: //p')
echo "$key" >"$site/llama_cpp/lib/farm-build-key"
