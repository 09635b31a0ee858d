"""CPU facts of this machine as Ray node labels: vendor, model, microarchitecture family, ISA level,
physical cores, memory, NUMA nodes. `ray start --labels` gets them from `farm labels` (the scripts
in clusters/ do this), and every benchmark records them beside its numbers.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

# (vendor, family) -> [(first model, last model, name)], from the CPUID family/model numbers.
MICROARCH = {
    ("intel", 6): [(0x3C, 0x3F, "haswell"), (0x4F, 0x4F, "broadwell"), (0x55, 0x55, "skylake-sp"),
                   (0x6A, 0x6C, "icelake"), (0x8F, 0x8F, "sapphire-rapids"), (0xAD, 0xAE, "granite-rapids"),
                   (0xCF, 0xCF, "emerald-rapids"), (0x97, 0x9A, "alderlake"), (0xB7, 0xBF, "raptorlake")],
    ("amd", 0x17): [(0x00, 0x2F, "zen1"), (0x30, 0xFF, "zen2")],
    ("amd", 0x19): [(0x00, 0x0F, "zen3"), (0x10, 0x1F, "zen4"), (0x20, 0x5F, "zen3"), (0x60, 0x7F, "zen4"),
                    (0xA0, 0xAF, "zen4")],
    ("amd", 0x1A): [(0x00, 0xFF, "zen5")],
}


def parse_cpuinfo(text: str) -> dict:
    first: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if first:
                break
            continue
        key, _, value = line.partition(":")
        first[key.strip()] = value.strip()
    vendor_id = first.get("vendor_id", "")
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor_id, vendor_id.lower() or "unknown")
    family = int(first.get("cpu family", "0") or 0)
    model = int(first.get("model", "0") or 0)
    stepping = int(first.get("stepping", "0") or 0)
    flags = set(first.get("flags", "").split())
    arch, source = "unknown", "cpuid"
    for lo, hi, name in MICROARCH.get((vendor, family), []):
        if lo <= model <= hi:
            arch = name
    if arch == "skylake-sp" and stepping >= 5:
        arch = "cascadelake"
    if arch == "unknown":  # a hypervisor may mask the model number (KVM showed an AMX Xeon as model 167)
        arch, source = infer_family(vendor, flags), "flags"
    return {"vendor": vendor, "model_name": first.get("model name", "unknown"), "family": arch,
            "family_source": source, "isa": isa_level(flags)}


# (vendor, flags that must all be present, the oldest family that has them), newest first: where the CPUID
# model is masked or new, the ISA extensions still tell the family's lower bound.
FLAG_FAMILIES = [
    ("intel", {"amx_fp16"}, "granite-rapids"),
    ("intel", {"amx_int8", "avx512_fp16"}, "sapphire-rapids"),
    ("intel", {"avx512_bf16", "avx512_vnni"}, "cooperlake"),
    ("intel", {"avx512_vnni", "avx512_vbmi2"}, "icelake"),
    ("intel", {"avx512_vnni"}, "cascadelake"),
    ("intel", {"avx512f"}, "skylake-sp"),
    ("intel", {"avx_vnni"}, "alderlake"),
    ("intel", {"avx2"}, "haswell"),
    ("amd", {"avx_vnni", "avx512f", "movdir64b"}, "zen5"),
    ("amd", {"avx512f"}, "zen4"),
    ("amd", {"vaes", "avx2"}, "zen3"),
    ("amd", {"avx2"}, "zen1"),
]


def infer_family(vendor: str, flags: set[str]) -> str:
    """The oldest microarchitecture family with this CPU's ISA extensions (a lower bound: a Sapphire
    Rapids and an Emerald Rapids look alike), or 'unknown'."""
    for v, need, name in FLAG_FAMILIES:
        if v == vendor and need <= flags:
            return name
    return "unknown"


def isa_level(flags: set[str]) -> str:
    if {"amx_tile", "amx_int8"} <= flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "sse"


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def label_value(text: str) -> str:
    """A Ray/Kubernetes label value: [A-Za-z0-9._-], at most 63, alphanumeric at both ends."""
    text = re.sub(r"\((r|tm)\)", "", text, flags=re.IGNORECASE)
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._").lower()
    return text[:63].strip("-._") or "unknown"


def facts() -> dict:
    import psutil

    cpu = parse_cpuinfo(Path("/proc/cpuinfo").read_text()) if Path("/proc/cpuinfo").exists() else {
        "vendor": "unknown", "model_name": platform.processor() or "unknown", "family": "unknown",
        "family_source": "none", "isa": "unknown"}
    numa = len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1
    return {**cpu, "cores": physical_cores(), "logical_cpus": os.cpu_count() or 1,
            "memory_gb": round(psutil.virtual_memory().total / 2**30), "numa_nodes": numa,
            "hostname": platform.node()}


def labels(f: dict | None = None) -> dict[str, str]:
    f = f or facts()
    return {
        "farm/cpu-vendor": label_value(f["vendor"]),
        "farm/cpu-model": label_value(f["model_name"]),
        "farm/cpu-family": label_value(f["family"]),
        "farm/cpu-family-from": f.get("family_source", "cpuid"),  # "flags": inferred, the model was masked
        "farm/isa": f["isa"],
        "farm/cores": str(f["cores"]),
        "farm/memory-gb": str(f["memory_gb"]),
        "farm/numa-nodes": str(f["numa_nodes"]),
    }


def labels_arg(extra: dict[str, str] | None = None) -> str:
    """The value for `ray start --labels`."""
    return ",".join(f"{k}={v}" for k, v in {**labels(), **(extra or {})}.items())
