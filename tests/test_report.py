"""The report's pure parts (farm/report.py): speed-ups against both baselines, orderings the field knows."""

from farm.decide import report


def cell(i, fmt, quant, ppl, kl, tps, pipeline="none", baseline=False, target="t", **extra):
    return {"id": i, "label": i, "target": target, "baseline": baseline, "format": fmt, "quant": quant,
            "pipeline": pipeline, "runtime": fmt, "metrics": {"perplexity": ppl, "kl_div": kl, "decode_tok_s": tps},
            **extra}


def test_speedups_against_torch_and_the_fastest_full_precision_runtime():
    rows = [cell("torch", "torch", "fp32", 10, 0, 20, baseline=True), cell("ov32", "openvino", "fp32", 10, 0, 40),
            cell("ort32", "onnx", "fp32", 10, 0, 30), cell("q4", "gguf", "Q4_0", 11, .1, 120),
            cell("pruned32", "onnx", "fp32", 12, .2, 60, pipeline="prune_layers"),  # not the base model: no baseline
            cell("dirty32", "onnx", "fp32", 10, 0, 500, contaminated=True)]  # disturbed: never a baseline
    sp = report.baselines(rows)
    assert sp["q4"]["speedup_vs_torch"] == 6.0 and sp["q4"]["speedup_vs_best_fp32"] == 3.0
    assert sp["q4"]["best_fp32"] == "ov32" and sp["torch"]["speedup_vs_torch"] == 1.0


def test_known_orderings_pass_and_fail():
    good = [cell("f16", "gguf", "F16", 10.00, .001, 50), cell("q8", "gguf", "Q8_0", 10.02, .002, 80),
            cell("q4km", "gguf", "Q4_K_M", 10.6, .05, 120)]
    checks = report.ordering_checks(good)
    assert len(checks) == 3 and all(k["ok"] for k in checks), checks
    bad = [cell("f16", "gguf", "F16", 10.00, .001, 50), cell("q8", "gguf", "Q8_0", 10.9, .09, 80),
           cell("q4km", "gguf", "Q4_K_M", 10.6, .05, 120)]
    failed = {k["check"] for k in report.ordering_checks(bad) if not k["ok"]}
    assert failed == {"perplexity: F16 ~ Q8_0 < Q4_K_M", "kl_div: F16 ~ Q8_0 < Q4_K_M",
                      "perplexity: Q8_0 within 1 % of F16"}


def test_data_aware_int4_is_checked_against_data_free_at_the_same_group_size():
    rows = [cell("rtn", "onnx", "int4", 12.0, .1, 90, algorithm="rtn", group_size="32"),
            cell("gptq", "onnx", "int4", 11.5, .08, 90, algorithm="gptq", group_size="32"),
            cell("gptq64", "onnx", "int4", 13.0, .2, 90, algorithm="gptq", group_size="64")]  # no rtn at 64
    [check] = report.ordering_checks(rows)
    assert check["ok"] and check["cells"] == "gptq vs rtn"
    rows[1]["metrics"]["perplexity"] = 12.5
    assert not report.ordering_checks(rows)[0]["ok"]
