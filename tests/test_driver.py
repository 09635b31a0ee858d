from farm.plan.grid import Stage
from farm.run.cluster import selector_matches, task_options

LABELS = {"farm/isa": "amx", "farm/cpu-family": "sapphire-rapids", "farm/node": "a"}


def test_label_selector_semantics():
    assert selector_matches({}, LABELS)
    assert selector_matches({"farm/isa": "amx"}, LABELS)
    assert not selector_matches({"farm/isa": "avx2"}, LABELS)
    assert selector_matches({"farm/isa": "!avx2"}, LABELS) and not selector_matches({"farm/isa": "!amx"}, LABELS)
    assert selector_matches({"farm/cpu-family": "in(icelake,sapphire-rapids)"}, LABELS)
    assert not selector_matches({"farm/cpu-family": "!in(icelake,sapphire-rapids)"}, LABELS)
    assert not selector_matches({"farm/missing": "x"}, LABELS)


def test_benchmarks_take_a_whole_node_and_others_a_memory_request():
    bench = Stage("b1", "bench", {"target": {"name": "t", "labels": {"farm/isa": "amx"}}}, ())
    opts = task_options(bench, {"t": 8}, 10**9)
    assert opts["num_cpus"] == 8 and opts["resources"] == {"bench_slot": 1}
    assert opts["label_selector"] == {"farm/isa": "amx"} and "memory" not in opts
    export = Stage("e1", "export", {"format": "gguf", "quant": "F16"}, ())
    opts = task_options(export, {"t": 8}, 10**9)
    assert opts["num_cpus"] == 1 and opts["memory"] == 3 * 10**9 + 2**30
    assert "memory" not in task_options(export, {}, None)
    # the sweep's stage_memory_gb replaces the estimate (and the memory guard enforces it)
    assert task_options(export, {"t": 8}, 10**9, stage_memory=5 * 2**30)["memory"] == 5 * 2**30
    assert "memory" not in task_options(bench, {"t": 8}, 10**9, stage_memory=5 * 2**30)


def test_remote_code_permission_only_when_the_sweep_opts_in():
    export = Stage("e1", "export", {"format": "gguf", "quant": "F16"}, ())
    assert "runtime_env" not in task_options(export, {}, None)
    opts = task_options(export, {}, None, trust_code=True)
    assert opts["runtime_env"] == {"env_vars": {"FARM_TRUST_REMOTE_CODE": "1"}} and opts["num_cpus"] == 1
