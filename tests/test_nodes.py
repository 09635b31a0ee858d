import re

from farm import nodes
from farm.sweep.sections import LABEL_KEY

SPR = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8488C
stepping\t: 8
flags\t\t: fpu avx avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8

processor\t: 1
"""
ICX = SPR.replace("143", "106").replace("Platinum 8488C", "Platinum 8375C").replace(
    " amx_bf16 amx_tile amx_int8", "")
ZEN4 = "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9R14\nflags\t\t: avx2 avx512f\n"
OLD = "vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 63\nmodel name\t: Intel Xeon E5\nflags\t\t: avx avx2\n"


def test_families_and_isa():
    assert nodes.parse_cpuinfo(SPR) == {"vendor": "intel", "model_name": "Intel(R) Xeon(R) Platinum 8488C",
                                        "family": "sapphire-rapids", "family_source": "cpuid", "isa": "amx"}
    icx = nodes.parse_cpuinfo(ICX)
    assert (icx["family"], icx["isa"]) == ("icelake", "avx512-vnni")
    assert nodes.parse_cpuinfo(ZEN4)["family"] == "zen4"
    assert nodes.parse_cpuinfo(OLD)["isa"] == "avx2" and nodes.parse_cpuinfo(OLD)["family"] == "haswell"


def test_labels_are_valid_ray_labels():
    facts = {**nodes.parse_cpuinfo(SPR), "cores": 48, "memory_gb": 384, "numa_nodes": 2}
    labels = nodes.labels(facts)
    assert labels["farm/cpu-model"] == "intel-xeon-platinum-8488c"
    assert labels["farm/isa"] == "amx" and labels["farm/cpu-family"] == "sapphire-rapids"
    for k, v in labels.items():
        assert re.match(LABEL_KEY, k) and re.match(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$", v)


def test_this_machine():
    f = nodes.facts()
    assert f["cores"] >= 1 and f["memory_gb"] >= 1
    assert "farm/isa" in nodes.labels_arg()


def test_family_inferred_from_flags_when_the_hypervisor_masks_the_model():
    """KVM showed an AMX Xeon as model 167 (no such server part): the flags still bound the family."""
    masked = SPR.replace("model\t\t: 143", "model\t\t: 167").replace("amx_int8", "amx_int8 avx512_fp16 avx512_bf16")
    f = nodes.parse_cpuinfo(masked)
    assert (f["family"], f["family_source"], f["isa"]) == ("sapphire-rapids", "flags", "amx")
    assert nodes.labels({**f, "cores": 2, "memory_gb": 24, "numa_nodes": 1})["farm/cpu-family-from"] == "flags"
    # without AVX512-FP16 the same AMX flags do not prove Sapphire Rapids: the next bound down is taken
    assert nodes.parse_cpuinfo(SPR.replace("143", "167"))["family"] == "cascadelake"
    assert nodes.infer_family("amd", {"avx2", "avx512f"}) == "zen4"
    assert nodes.infer_family("amd", {"avx2", "vaes"}) == "zen3"
    assert nodes.infer_family("intel", {"sse4_2"}) == "unknown"
    assert nodes.parse_cpuinfo(ICX)["family_source"] == "cpuid"  # a known model number is not overridden
