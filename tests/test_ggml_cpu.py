"""llama.cpp's CPU backend: one library per ISA level, the best that runs here, AMX only when asked."""

import pytest

from farm.runtimes import ggml_cpu

ZEN4 = {"x64": 1, "haswell": 52, "skylakex": 96, "icelake": 184, "zen4": 248, "sapphirerapids": 0}
SPR = {**ZEN4, "sapphirerapids": 504}


def test_the_best_variant_without_amx_by_default():
    assert ggml_cpu.choose(ZEN4, amx=False) == "zen4"
    assert ggml_cpu.choose(SPR, amx=False) == "zen4"  # AVX-512 VBMI/VNNI/BF16 kernels, no AMX
    assert ggml_cpu.choose(SPR, amx=True) == "sapphirerapids"


def test_amx_asked_for_where_there_is_none_says_so():
    with pytest.raises(RuntimeError, match="amx: true asks for llama.cpp's AMX kernels, but no AMX variant"):
        ggml_cpu.choose(ZEN4, amx=True)
    with pytest.raises(RuntimeError, match="no llama.cpp CPU variant runs"):
        ggml_cpu.choose({"zen4": 0}, amx=False)


def test_this_machine_runs_a_variant_its_cpu_supports():
    """The installed llama-cpp-python is the multi-variant build (scripts/build-llama-cpp.sh): its
    libraries score this CPU, and the one chosen is what llama.cpp then reports it runs."""
    found = ggml_cpu.variants()
    assert {"x64", "haswell", "skylakex", "zen4", "sapphirerapids"} <= set(found), sorted(found)
    scores = {v: ggml_cpu.score(p) for v, p in found.items()}
    assert scores["x64"] > 0 and max(scores.values()) > scores["x64"]
    assert ggml_cpu.choose(scores, amx=False) not in ggml_cpu.AMX_VARIANTS


def test_a_forced_variant_is_what_loads_and_a_bad_one_is_refused():
    """FARM_GGML_CPU_VARIANT (benchmarks/llamacpp_paths.py) picks the library; llama.cpp then reports that
    library's features (haswell: AVX2, no AVX-512). One process per choice: backends stay loaded."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import json; from farm.runtimes import ggml_cpu; c = ggml_cpu.select(False); "
            "print(json.dumps([c['cpu_variant'], ggml_cpu.system_features()]))")
    env = {**os.environ, "FARM_GGML_CPU_VARIANT": "haswell"}
    out = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120)
    variant, feats = json.loads(out.stdout.strip().splitlines()[-1])
    assert variant == "haswell" and feats.get("AVX2") == "1" and "AVX512" not in feats
    env["FARM_GGML_CPU_VARIANT"] = "sapphirerapids" if "amx_int8" not in Path("/proc/cpuinfo").read_text() else "nosuch"
    bad = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not a variant that runs on this CPU" in bad.stderr
