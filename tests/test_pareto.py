from farm.decide import pareto

OBJ = {"perplexity": "min", "decode_tok_s": "max"}


def row(i, ppl, tps, target="t", baseline=False):
    return {"id": i, "target": target, "baseline": baseline, "label": i,
            "metrics": {"perplexity": ppl, "decode_tok_s": tps}}


def test_front_and_domination():
    rows = [row("a", 10, 10, baseline=True), row("b", 12, 50), row("c", 13, 40), row("d", 11, 20)]
    s = pareto.front(rows, OBJ, [])
    assert {k for k, v in s.items() if v["pareto"]} == {"a", "b", "d"}  # c is dominated by b


def test_equal_points_do_not_dominate_each_other():
    rows = [row("a", 10, 10), row("b", 10, 10)]
    s = pareto.front(rows, OBJ, [])
    assert s["a"]["pareto"] and s["b"]["pareto"]


def test_constraints_absolute_and_relative_to_baseline():
    rows = [row("base", 10, 10, baseline=True), row("fast", 16, 90), row("ok", 14, 60)]
    s = pareto.front(rows, OBJ, [{"metric": "perplexity", "max_ratio_to_baseline": 1.5}])
    assert not s["fast"]["feasible"] and "baseline" in s["fast"]["reason"]
    assert s["ok"]["pareto"] and s["base"]["pareto"]
    s = pareto.front(rows, OBJ, [{"metric": "decode_tok_s", "min": 50}])
    assert {k for k, v in s.items() if v["pareto"]} == {"fast", "ok"}


def test_front_is_per_target():
    rows = [row("a", 10, 10, "x"), row("b", 12, 50, "y"), row("c", 13, 40, "y")]
    s = pareto.front(rows, OBJ, [])
    assert s["a"]["pareto"]  # alone on its target, not dominated by y's faster cells
    assert s["b"]["pareto"] and not s["c"]["pareto"]


def test_missing_objective_is_infeasible_and_pick():
    rows = [row("a", 10, 10), {"id": "z", "target": "t", "label": "z", "metrics": {"perplexity": 1}}]
    s = pareto.front(rows, OBJ, [])
    assert not s["z"]["feasible"] and s["a"]["pareto"]
    assert pareto.pick(rows, s, "decode_tok_s", "max")["id"] == "a"
    text = pareto.table(rows, s, ["perplexity", "decode_tok_s"])
    assert "*" in text.splitlines()[1] or "*" in text.splitlines()[2]


def test_a_contaminated_benchmark_never_reaches_the_front():
    rows = [row("base", 10, 10, baseline=True), row("dirty", 9, 90), row("clean", 11, 50)]
    rows[1]["contaminated"] = True  # best on both objectives, but its speed was measured under other load
    s = pareto.front(rows, OBJ, [])
    assert not s["dirty"]["feasible"] and not s["dirty"]["pareto"] and "contaminated" in s["dirty"]["reason"]
    assert s["clean"]["pareto"]  # no longer dominated by a figure that is not the cell's
    assert pareto.pick(rows, s, "decode_tok_s", "max")["id"] == "clean"
