import copy
import json
from pathlib import Path

import yaml

from farm.plan import grid
from farm.sweep import spec

DEMO = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml").read_text())
DEMO["pipelines"][1][0]["drop"] = [2, 4]  # a step grid: two pruned pipelines


def build(mutate=None):
    d = copy.deepcopy(DEMO)
    if mutate:
        mutate(d)
    return grid.build(spec.parse(d))


def test_cells_are_pipelines_x_exports_x_targets_plus_baseline():
    g = build()
    # pipelines: base, drop 2, drop 4 (a grid); exports: 4 GGUF + 3 ONNX + 1 ONNX GenAI + 3 OpenVINO; 1 target;
    # + the torch baseline
    assert len(g.cells) == 3 * (4 + 3 + 1 + 3) + 1
    baselines = [c for c in g.cells if c.baseline]
    assert len(baselines) == 1
    assert baselines[0].spec["export"] == {"format": "torch", "quant": "fp32", "runtime": {"name": "torch"}}


def test_shared_stages_appear_once():
    g = build()
    kinds = [s.kind for s in g.stages.values()]
    assert kinds.count("base") == 1 and kinds.count("reference") == 1
    assert kinds.count("compress") == 2  # drop 2, drop 4
    # per model: 4 GGUF, 3 ONNX, 1 ONNX GenAI, 3 OpenVINO export stages; + the torch baseline export
    assert kinds.count("export") == 3 * (4 + 3 + 1 + 3) + 1
    f16 = [s for s in g.stages.values() if s.kind == "export" and s.params["quant"] == "F16"]
    for s in g.stages.values():
        if s.kind == "export" and s.params["quant"] in ("Q8_0", "Q4_K_M", "Q4_0"):
            assert s.deps[0] in {f.id for f in f16}


def test_dependencies_come_first():
    g = build()
    seen = set()
    for sid, s in g.stages.items():
        assert all(d in seen for d in s.deps)
        seen.add(sid)


def test_ids_are_content_derived():
    a, b = build(), build()
    assert list(a.stages) == list(b.stages) and [c.id for c in a.cells] == [c.id for c in b.cells]

    def more_eval(d):
        d["bench"]["repeats"] = 5

    c = build(more_eval)
    # only bench stages (and so cells) change; compress/export/evaluate stay shared
    changed = {s.kind for sid, s in c.stages.items() if sid not in a.stages}
    assert changed == {"bench", "roofline"}  # the roofline reads the benchmark (and its context)


def test_two_targets_share_everything_but_bench():
    def two(d):
        d["targets"] = [{"name": "amx", "labels": {"farm/isa": "amx"}}, {"name": "avx512", "labels": {}}]

    g = build(two)
    assert len(g.cells) == 2 * 34
    kinds = [s.kind for s in g.stages.values()]
    assert kinds.count("bench") == 2 * 34 and kinds.count("evaluate") == kinds.count("tasks") == 34


def test_flat_params():
    g = build()
    pruned = next(c for c in g.cells if c.spec["compress"])
    p = pruned.params()
    assert p["compress.method"] == "prune_layers"
    assert p["compress.prune_layers.drop"] in ("2", "4")
    assert p["export.format"] == "gguf" and p["target.name"] == "local"
    assert next(c for c in g.cells if c.baseline).params()["compress.method"] == "none"


def test_llamacpp_runtime_options_measure_one_file_several_ways():
    """amx / repack are runtime options: a grid of them shares one export stage, each gets its own
    evaluate and bench stages, and they show in the cell's params and label."""
    from farm.record.cells import cell_label

    def only_q4(d):
        d["pipelines"] = [[]]
        d["exports"] = [{"format": "gguf", "quant": "Q4_0",
                         "runtime": {"name": "llamacpp", "amx": [False, True], "repack": [True, False]}}]

    g = build(only_q4)
    cells = [c for c in g.cells if not c.baseline]
    assert len(cells) == 4 and len({c.export for c in cells}) == 1
    assert len({c.stages.get("evaluate") for c in cells}) == 4 and len({c.stages.get("bench") for c in cells}) == 4
    assert {json.dumps(g.stages[c.stages.get("evaluate")].params["runtime"], sort_keys=True) for c in cells} == {
        json.dumps({"name": "llamacpp", "amx": a, "repack": r}, sort_keys=True) for a in (False, True)
        for r in (True, False)}
    labels = {cell_label(c) for c in cells}
    assert labels == {"base/gguf-Q4_0@local", "base/gguf-Q4_0-amx@local", "base/gguf-Q4_0-norepack@local",
                      "base/gguf-Q4_0-amx-norepack@local"}
    assert {c.params()["export.runtime.amx"] for c in cells} == {"True", "False"}


def test_runtime_options_belong_to_their_runtime_and_runtimes_to_their_formats():
    import pytest

    from farm.errors import SpecError

    d = copy.deepcopy(DEMO)
    d["exports"] = [{"format": "onnx", "quant": "int8", "runtime": {"name": "onnxruntime", "amx": True}}]
    with pytest.raises(SpecError, match=r"exports\[0\]\.runtime: onnxruntime: amx: Extra inputs"):
        spec.parse(d)
    d["exports"] = [{"format": "onnx", "quant": "int8", "runtime": "llamacpp"}]
    with pytest.raises(SpecError, match=r"exports\[0\]\.runtime: 'llamacpp' is not a runtime of format 'onnx'"):
        spec.parse(d)


def test_a_runtime_option_on_the_export_itself_says_where_it_goes():
    import pytest

    from farm.errors import SpecError

    d = copy.deepcopy(DEMO)
    d["exports"] = [{"format": "gguf", "quant": "Q4_0", "amx": [False, True]}]  # the syntax before runtimes
    with pytest.raises(SpecError, match=r"exports\[0\]\.amx: unknown key 'amx' in exports\[0\] — it is an option "
                       r"of the llamacpp runtime: write runtime: \{name: llamacpp, amx: \.\.\.\}"):
        spec.parse(d)

