# Sourced by build-llama-cpp.sh (the Python wheel) and build-llama-server.sh (llama.cpp's own server): the one
# llama.cpp source both are built from, so the server a model is served with runs the code it was measured with.
#   VERSION   the llama-cpp-python release pinned in requirements.lock (its sdist vendors llama.cpp)
#   FLAGS     GGML_NATIVE off, GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS: one CPU backend library per x86 ISA
#             level (x64 ... zen4, sapphirerapids; farm/runtimes/ggml_cpu.py picks one at run time), so a build
#             made on one CPU kind runs on every other (a native build made on an AMX Xeon dies with SIGILL on
#             an older CPU, and pip's own wheel cache does not key on CMAKE_ARGS, so it would hand that back)
#   KEY       version + flags + patch + machine: the cache directories' names
#   llama_cpp_source WORK   downloads the sdist into WORK, checks it against the pinned sha256, unpacks and
#             patches it; prints the unpacked directory
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VERSION=$(sed -n 's/^llama[-_]cpp[-_]python==\([^ ]*\).*/\1/Ip' "$ROOT/requirements.lock")
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
KEY=$(printf '%s %s %s %s' "$VERSION" "$FLAGS" "$AMX_TO" "$(uname -m)" | sha256sum | cut -c1-12)

llama_cpp_source() {
  local work=$1 pip=${PIP:-pip} mmq
  "$pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$work/sdist" >&2
  # the sdist's code is compiled and run: it must be the pinned one
  (cd "$work/sdist" && grep -F "llama_cpp_python-$VERSION.tar.gz" "$ROOT/farm/export/llama_cpp_sdist.sha256" | sha256sum -c --quiet) \
    || { echo "farm: llama-cpp-python $VERSION sdist does not match farm/export/llama_cpp_sdist.sha256" >&2; return 1; }
  tar -xzf "$work"/sdist/*.tar.gz -C "$work"
  mmq=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp)
  grep -qF "$AMX_FROM" "$mmq" || { echo "farm: $mmq changed upstream; review the AMX fix in $0" >&2; return 1; }
  python3 -c 'import sys; p, a, b = sys.argv[1:]; s = open(p).read(); open(p, "w").write(s.replace(a, b))' \
    "$mmq" "$AMX_FROM" "$AMX_TO"
  grep -qF "$AMX_TO" "$mmq"
  echo "$work"/llama_cpp_python-*/
}
