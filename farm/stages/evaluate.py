"""Quality through the cell's own runtime: perplexity on held-out text, KL divergence and top-1 agreement with the
base model's logits (the reference), and the long-context probe where data.long_window_tokens is set."""

from __future__ import annotations

from pathlib import Path

from farm.plugin import Metric
from farm.stages.common import describe, runtime_module, threads_here

KIND = "evaluate"
PER = "runtime"  # one per runtime setting of each export: quality does not depend on the node
INPUTS = ("export", "reference")
METRICS = (
    Metric("perplexity", "min", label="perplexity on held-out text (lower is better)", short="ppl", fmt=".3f"),
    Metric("kl_div", "min", label="KL divergence from the base model (lower is better)", short="kl", fmt=".4f"),
    Metric("top1_agree", "max", label="top-1 agreement with the base model", short="top1", fmt=".3f"),
    Metric("perplexity_near", "min", label="perplexity in the first window of the long probe"),
    Metric("perplexity_far", "min", label="perplexity far into the long probe's windows"),
)


def params(ctx: dict) -> dict:
    return {"data": ctx["data"], "runtime": ctx["runtime"]}


def check(sweep) -> None:
    if any(m in ("perplexity_near", "perplexity_far") for m in sweep.metrics_used()) and not sweep.data.long_window_tokens:
        raise ValueError("perplexity_near / perplexity_far come from the long-context probe: set "
                         "data.long_window_tokens (e.g. 2048)")


def code(params: dict) -> list[str]:
    return ["farm.measure.quality", runtime_module(params["runtime"])]


def run(stage, deps: list[dict], out: Path) -> dict:
    from farm.measure.quality import evaluate_isolated

    export, reference = deps
    runtime = stage.params["runtime"]
    metrics = evaluate_isolated(runtime, Path(export["artifact"]), Path(reference["reference_dir"]),
                                threads_here(), out / "quality.json", describe(export, runtime))
    return {"metrics": metrics}
