"""Which CPU code llama.cpp runs: the ISA variant of its CPU backend, AMX on or off, repack buffers.

farm builds llama-cpp-python the way llama.cpp's own releases are built for mixed fleets
(scripts/build-llama-cpp.sh): GGML_BACKEND_DL with GGML_CPU_ALL_VARIANTS, one
`libggml-cpu-<variant>.so` per x86 ISA level (x64, sse42, haswell, skylakex, icelake, zen4,
sapphirerapids, ...). Each variant reports a score for the CPU it is loaded on (0: it cannot run here).
llama.cpp alone would load the best-scoring variant; farm loads it itself, before the first model, so
that it can leave out the AMX variant: on the AMX Xeons seen here llama.cpp's AMX matmul crashed every
quantized model (SIGSEGV in ggml_backend_amx_mul_mat), so AMX is off unless a sweep asks for it
(`amx: true` on a gguf export), and the best variant without AMX (e.g. zen4: AVX-512 VBMI/VNNI/BF16)
runs with its repack kernels. `repack: false` turns the CPU's extra buffer types off altogether
(llama_model_params.use_extra_bufts), which is also what removes AMX from a single-variant build.

What ran is returned by `select()` and recorded with every GGUF cell (farm.runtime.* tags).
FARM_GGML_CPU_VARIANT=<name> forces a variant (benchmarks/llamacpp_paths.py compares them).
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

AMX_VARIANTS = ("sapphirerapids",)  # variants built with GGML_AMX_INT8 (llama.cpp's ggml/src/CMakeLists.txt)
_chosen: dict | None = None


def lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def variants(directory: Path | None = None) -> dict[str, Path]:
    """variant name -> library, as the build installed them; {} for a single-variant (native) build."""
    d = directory or lib_dir()
    out = {}
    for p in sorted(d.glob("libggml-cpu-*.so")):
        out[p.name[len("libggml-cpu-"):-len(".so")]] = p
    return out


def score(path: Path) -> int:
    """The variant's own verdict on this CPU (ggml_backend_score: 0 = missing an ISA feature it needs).
    The library is closed again, as llama.cpp's loader does when it scores variants."""
    import _ctypes

    lib = ctypes.CDLL(str(path))
    try:
        fn = lib.ggml_backend_score
        fn.restype = ctypes.c_int
        return int(fn())
    finally:
        _ctypes.dlclose(lib._handle)


def choose(scores: dict[str, int], amx: bool) -> str:
    """The best-scoring variant that runs here; AMX variants only when amx is asked for."""
    usable = {v: s for v, s in scores.items() if s > 0 and (amx or v not in AMX_VARIANTS)}
    if amx and not any(v in AMX_VARIANTS for v in usable):
        have = sorted(v for v, s in scores.items() if s > 0)
        raise RuntimeError(f"amx: true asks for llama.cpp's AMX kernels, but no AMX variant can run on this CPU "
                           f"(usable variants: {', '.join(have) or 'none'}); set amx: false or target an AMX node "
                           "(labels {farm/isa: amx})")
    if not usable:
        raise RuntimeError(f"no llama.cpp CPU variant runs on this CPU (scores {scores})")
    return max(usable, key=lambda v: (usable[v], v in AMX_VARIANTS))


def select(amx: bool = False) -> dict:
    """Load the CPU backend for this process (once; llama_backend_init then loads nothing else).
    Returns what was chosen: {"cpu_variant", "amx", "variant_scores"}. A second call with another
    `amx` than the first cannot switch (ggml backends stay loaded for the process): it raises."""
    global _chosen
    import llama_cpp  # loads libllama, libggml and libggml-base

    if _chosen is not None:
        if _chosen["amx_requested"] != amx:
            raise RuntimeError("llama.cpp's CPU backend is already loaded in this process with "
                               f"amx={_chosen['amx_requested']}; run amx={amx} in another process")
        return _chosen
    found = variants()
    if not found:  # a build without GGML_BACKEND_DL: one CPU backend, compiled for its build machine
        _chosen = {"cpu_variant": "static", "amx_requested": amx, "variant_scores": {}}
        return _chosen
    scores = {v: score(p) for v, p in found.items()}
    name = os.environ.get("FARM_GGML_CPU_VARIANT") or choose(scores, amx)  # a diagnostic override
    if name not in found or scores[name] <= 0:
        raise RuntimeError(f"FARM_GGML_CPU_VARIANT={name}: not a variant that runs on this CPU "
                           f"(scores {scores})")
    # through libllama's own handle: dlsym searches its dependencies, so this is the libggml.so.0 that
    # libllama uses (the wheel holds libggml.so and libggml.so.0 as two copies: loading one by path would
    # give a second backend registry that libllama never sees)
    ggml = llama_cpp.llama_cpp._lib
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    if not ggml.ggml_backend_load(str(found[name]).encode()):
        raise RuntimeError(f"llama.cpp could not load its CPU backend {found[name]}")
    _chosen = {"cpu_variant": name, "amx_requested": amx, "variant_scores": scores}
    return _chosen


def system_features() -> dict[str, str]:
    """What the loaded CPU backend says of itself (llama_print_system_info): {"AVX512": "1", "AMX_INT8": "1", ...}."""
    import llama_cpp

    text = llama_cpp.llama_print_system_info().decode(errors="replace")
    return dict(re.findall(r"([A-Z0-9_]+) = (\S+)", text))


def settings(amx: bool, repack: bool) -> dict[str, str]:
    """The farm.runtime.* tags of a GGUF cell: variant, AMX and repack as they actually ran."""
    chosen = select(amx)
    feats = system_features()
    uses_amx = feats.get("AMX_INT8") == "1" and repack  # the AMX buffer type is an extra buffer type
    return {"cpu_variant": chosen["cpu_variant"], "amx": str(uses_amx).lower(), "repack": str(repack).lower(),
            "cpu_features": ",".join(k for k, v in sorted(feats.items()) if v == "1")}
