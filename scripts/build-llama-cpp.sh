#!/usr/bin/env bash
# Install llama-cpp-python built for every CPU the farm tags, the way llama.cpp's own releases are built
# for mixed fleets (flags, source and AMX fix: scripts/llama-cpp-source.sh, shared with build-llama-server.sh).
# The wheel is built once per version and flag set (~10 min on 2 cores) and kept outside the clone, in
# $FARM_WHEEL_CACHE (default: farm-wheels/ in pip's cache directory), where the next clone finds it.
#   usage: scripts/build-llama-cpp.sh PIP      (the pip of the virtualenv to install into)
set -euo pipefail
PIP=$1
source "$(dirname "$0")/llama-cpp-source.sh"
cache_root=${FARM_WHEEL_CACHE:-$("$PIP" cache dir 2>/dev/null || echo "$HOME/.cache/pip")/farm-wheels}
key=$KEY
cache="$cache_root/llama-cpp-python-$VERSION-$key"
site=$("$PIP" show llama-cpp-python 2>/dev/null | sed -n 's/^Location: //p' || true)  # empty: not installed
if [ -n "$site" ] && [ "$(cat "$site/llama_cpp/lib/farm-build-key" 2>/dev/null)" = "$key" ]; then
  exit 0  # this very build is installed
fi
if ! ls "$cache"/*.whl >/dev/null 2>&1; then
  echo "farm: building llama-cpp-python $VERSION for every CPU variant (once; ~10 min on 2 cores) into $cache"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  src=$(llama_cpp_source "$work")
  CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PIP" wheel -q --no-deps -w "$work/wheel" "$src"
  mkdir -p "$cache_root"
  mv "$work/wheel" "$cache.partial.$$" && mv -T "$cache.partial.$$" "$cache"  # whole, or not at all
fi
"$PIP" install -q --no-deps --force-reinstall "$cache"/*.whl
site=$("$PIP" show llama-cpp-python | sed -n 's/^Location: //p')
echo "$key" >"$site/llama_cpp/lib/farm-build-key"
