"""The serve benchmark (farm/serve/bench.py): a cell behind its serving engine on 127.0.0.1 under a bounded
concurrent load, after the single-stream phase, on the cells the sweep's `serve.cells` picks; alone on a node of
the cell's target like every benchmark. Its figures are curves over concurrency in the cell's MLflow run."""

from __future__ import annotations

import base64
import re
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from farm.plugin import Metric, Strict
from farm.serve.bench import SERVE_KEYS, SERVE_METRIC, serve_corpus_tokens
from farm.stages.common import model_dir, threads_here

KIND = "serve"
SECTION = "serve"
OPTIONAL = True
PER = "target"
INPUTS = ("export", "reference", "base")  # the base model's tokenizer
EXCLUSIVE = True
AFTER = True
PATHS = ("serve_json",)
FIGURES = (("serving: latency vs throughput under concurrent load", "serve.png"),)  # on the sweep's parent run
METRICS = tuple(Metric(rf"serve_(prefix_)?{k}_c[1-9][0-9]*", better, pattern=True) for k, better in SERVE_KEYS.items())


class ServeSpec(Strict):
    """The serve benchmark: cells behind their serving engine (farm/serve), under a bounded concurrent load."""
    cells: Literal["front", "format_front", "all"] = Field(
        "format_front", description="Which cells are served, after the single-stream phase: 'front' the sweep's "
        "Pareto front, 'format_front' the front of each servable runtime's own cells (so every engine is "
        "measured), 'all' every servable cell. Only runtimes with an engine are served (llamacpp, openvino).")
    per_runtime: int = Field(2, ge=1, le=1000, description="At most this many cells per runtime, the best on "
                             "promote.metric first.")
    concurrency: list[int] = Field([1, 2, 4], min_length=1, max_length=12,
                                   description="Concurrent streams, one level each (MLflow steps).")
    prompt_tokens: int = Field(128, ge=8, le=8192)
    output_tokens: int = Field(32, ge=1, le=4096, description="Tokens generated per request (EOS ignored).")
    requests: int | None = Field(None, ge=1, le=1024,
                                 description="Requests per level; default max(4, 2 x concurrency).")
    shared_prefix_tokens: int = Field(96, ge=0, description="A second pass whose prompts share this many leading "
                                      "tokens (the engines' prefix / prompt caches); 0: no second pass.")
    threads: int | None = Field(None, ge=1, le=1024, description="Engine threads; default: every CPU of the node.")
    timeout_s: float = Field(600, gt=0, le=7200, description="No level runs longer than this.")

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if any(c < 1 or c > 256 for c in v):
            raise ValueError("each concurrency level must be between 1 and 256")
        if sorted(set(v)) != v:
            raise ValueError(f"concurrency levels must be distinct and increasing, e.g. [1, 2, 4]; got {v}")
        return v

    @model_validator(mode="after")
    def _prefix(self) -> ServeSpec:
        if self.shared_prefix_tokens >= self.prompt_tokens:
            raise ValueError(f"shared_prefix_tokens ({self.shared_prefix_tokens}) must be below prompt_tokens "
                             f"({self.prompt_tokens}): every prompt needs tokens of its own")
        return self


Config = ServeSpec  # the section's model, as every stage kind names it


def check(sweep) -> None:
    """A serve metric in the objectives, constraints or promote policy needs every candidate served at that level
    (serve.cells 'all', the level in serve.concurrency); the prompts need corpus text enough."""
    for metric in dict.fromkeys(m for m in sweep.metrics_used() if re.match(SERVE_METRIC, m)):
        level = int(re.match(SERVE_METRIC, metric).group(3))
        if sweep.serve is None or sweep.serve.cells != "all" or level not in sweep.serve.concurrency:
            raise ValueError(f"'{metric}' is measured by the serve benchmark at concurrency {level}: it needs "
                             f"serve: {{cells: all, concurrency: [..., {level}]}} so that every candidate has it")
    if sweep.serve is None:
        return
    need = serve_corpus_tokens(sweep.serve.model_dump())
    have = sweep.data.calib_tokens + sweep.data.eval_windows * sweep.data.eval_window_tokens
    if need > have:
        raise ValueError(f"serve: its prompts (never repeated, so no cache serves them by accident) take {need} "
                         f"corpus tokens, the data section holds {have}; lower serve.requests / prompt_tokens / "
                         "concurrency, or raise data.calib_tokens")


def params(ctx: dict) -> dict | None:
    from farm.serve import ENGINES

    if ctx["sweep"].serve is None or ctx["runtime"]["name"] not in ENGINES:
        return None
    return {"serve": ctx["sweep"].serve.model_dump(), "target": ctx["target"], "runtime": ctx["runtime"],
            "reuse": ctx["sweep"].bench.reuse}


def reuse(stage) -> str:
    return stage.params["reuse"]  # a machine's serving curves stand for that machine only, as bench.reuse says


def code(params: dict) -> list[str]:
    from farm.serve import ENGINES

    return ["farm.serve.bench", ENGINES.module_name(params["runtime"]["name"])]


def run(stage, deps: list[dict], out: Path) -> dict:
    from farm.measure.quality import corpus_tokens
    from farm.serve import bench as servebench

    export, reference, base = deps
    spec = stage.params["serve"]
    threads = spec["threads"] or threads_here()
    _, corpus = corpus_tokens(Path(reference["reference_dir"]))  # the servers add a BOS themselves
    result = servebench.run(stage.params["runtime"], Path(export["artifact"]), model_dir(base), corpus, spec,
                            threads, out / "engine")
    servebench.save(result, out / "serve.json")
    return {"serve": result, "serve_json": "serve.json"}


def _png(curves: dict[str, dict]) -> dict:
    from farm.serve import bench as servebench

    with tempfile.TemporaryDirectory() as d:
        servebench.plot(curves, Path(d) / "serve.png")
        return {"base64": base64.b64encode((Path(d) / "serve.png").read_bytes()).decode()}


def phase(ctx) -> None:
    """The serve benchmark of the cells sweep.serve picks, one at a time per node like every benchmark, each logged
    to its cell's run (curves over concurrency: a metric's step is the concurrency), then every served cell's
    curves in one plot and table on the sweep's parent run."""
    from farm.serve import bench as servebench

    cfg, grid = ctx.sweep.serve, ctx.grid
    rows = ctx.rows()
    finished = {r["id"] for r in rows}
    runtime_of = {c.id: c.spec["export"]["runtime"]["name"] for c in grid.cells if KIND in c.stages and c.id in finished}
    named = [m for m in dict.fromkeys(ctx.sweep.metrics_used()) if any(x.matches(m) for x in METRICS)]
    metric, direction = ctx.promote_metric()
    chosen = ctx.pareto.served(rows, runtime_of, ctx.objectives(), ctx.constraints(), cfg.cells, cfg.per_runtime,
                               metric, direction, later=ctx.later())
    cells = [c for c in grid.cells if c.id in chosen]
    if not cells:
        ctx.say("farm: serve: no finished cell with a serving engine qualifies; nothing served")
        return
    ctx.say(f"\nfarm: serve benchmark ({cfg.cells}, concurrency {cfg.concurrency}) of {len(cells)} "
            f"cell(s): {', '.join(ctx.label(c) for c in cells)}")
    curves = {}
    cell_of = {c.stages[KIND]: c for c in cells}

    def done(sid, result, error):
        cell = cell_of[sid]
        label = ctx.label(cell)
        if error is not None:
            ctx.log.log_update(cell, KIND, None, error)
            ctx.say(f"farm: serve {label}: FAILED: {str(error).splitlines()[0][:300]}")
            return
        r = result["serve"]
        curves[label] = r
        tags = {"farm.serve.engine": r["engine"], "farm.serve.threads": str(r["threads"]),
                "farm.serve.parallel": str(r["parallel"]), "farm.serve.stage": result.get("stage", ""),
                **{f"farm.serve.{k}": str(v) for k, v in r.get("settings", {}).items()}}
        ctx.log.log_update(cell, KIND, {
            "metrics": [[k, v, step] for k, v, step in servebench.mlflow_metrics(r, set(named))], "tags": tags,
            "files": {"serve.json": r, "serve.txt": servebench.table(r), "serve.png": _png({label: r})}}, None)
        ctx.say(f"farm: serve {label} ({r['engine']}, {r['threads']} threads):\n" + servebench.table(r))

    ctx.run(list(cell_of), done)
    if curves:
        ctx.log.log_parent_files({"serve.txt": "\n\n".join(f"{label}\n{servebench.table(r)}"
                                                            for label, r in curves.items()),
                                  "serve.png": _png(curves)})
