"""The sweep file: pydantic models, validation with field paths. Imports neither torch, ray nor mlflow.

The sweep's own sections live here; a compression step's, an export's and a runtime's options live beside
their code (farm/compress, farm/export, farm/runtimes: `Options`), and the unions of them are built from the
registries (`sweep_model()`), so a new plug-in needs no line here.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from farm.compress import METHODS
from farm.errors import SpecError
from farm.export import FORMATS
from farm.modelref import EMBEDDED_MODELS, ModelShape, base_config, model_dir_problems, model_kind
from farm.plugin import Calibrated
from farm.runtimes import RUNTIMES, runtimes_for
from farm.tasks import NORMALISED, TASKS

# Every runtime reports these names, so MLflow's chart view compares cells across formats directly.
QUALITY_METRICS = ("perplexity", "kl_div", "top1_agree")
SPEED_METRICS = ("prefill_tok_s", "decode_tok_s", "ttft_ms", "token_latency_p50_ms", "token_latency_p90_ms",
                 "peak_rss_mb", "size_mb")
LONG_METRICS = ("perplexity_near", "perplexity_far")  # the long-context probe (data.long_window_tokens)
METRICS = QUALITY_METRICS + LONG_METRICS + SPEED_METRICS
# The serve benchmark's figures at one concurrency level, e.g. serve_output_tok_s_c4, serve_prefix_ttft_p50_ms_c2
SERVE_KEYS = {"output_tok_s": "max", "requests_s": "max", "ttft_p50_ms": "min", "ttft_p90_ms": "min",
              "itl_p50_ms": "min", "itl_p90_ms": "min", "e2e_p50_ms": "min", "e2e_p90_ms": "min"}
SERVE_METRIC = rf"^serve_(prefix_)?({'|'.join(SERVE_KEYS)})_c([1-9][0-9]*)$"
# Task accuracy (farm/tasks.py: lm-eval's definitions), e.g. acc.piqa, acc_norm.hellaswag, and the mean over tasks
TASK_METRIC = rf"^(acc|acc_norm)\.({'|'.join(TASKS)})$|^task_acc_mean$"
Metric = Union[Literal[METRICS], Annotated[str, Field(pattern=SERVE_METRIC)],  # type: ignore[valid-type]  # noqa: UP007
               Annotated[str, Field(pattern=TASK_METRIC)]]
# The direction in which a metric gets better; used when the spec does not say.
BETTER = {"perplexity": "min", "perplexity_near": "min", "perplexity_far": "min", "kl_div": "min", "top1_agree": "max",
          "prefill_tok_s": "max", "decode_tok_s": "max", "ttft_ms": "min", "token_latency_p50_ms": "min", "token_latency_p90_ms": "min", "peak_rss_mb": "min",
          "size_mb": "min"}


def is_serve_metric(metric: str) -> bool:
    """A figure of the serve benchmark at one level (serve_output_tok_s_c4, ...), known only after the serve phase."""
    return re.match(SERVE_METRIC, metric) is not None


def is_task_metric(metric: str) -> bool:
    """A task-accuracy figure (acc.piqa, task_acc_mean, ...), known only after the tasks phase."""
    return re.match(TASK_METRIC, metric) is not None or metric == "task_consistency"


def better(metric: str) -> str:
    if is_task_metric(metric):
        return "max"
    m = re.match(SERVE_METRIC, metric)
    return SERVE_KEYS[m.group(2)] if m else BETTER[metric]

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseSpec(Strict):
    model: str = Field(
        "smollm2-135m-instruct",
        description="An embedded model name, a local Hugging Face directory, or a hub id 'org/name'.",
    )
    revision: str | None = Field(None, description="Hub revision (hub ids only).")
    trust_remote_code: bool = Field(
        False, description="Run the model's own Python code (auto_map in config.json). Off unless you trust it."
    )


class DataSpec(Strict):
    files: list[str] = Field(
        default_factory=list,
        description="Your own UTF-8 text files; empty means the embedded corpus (Python's pydoc topics).",
    )
    calib_tokens: int = Field(4096, ge=256, le=1_000_000, description="Tokens of calibration text.")
    eval_windows: int = Field(4, ge=1, le=512, description="Evaluation windows (disjoint from calibration).")
    eval_window_tokens: int = Field(256, ge=16, le=8192, description="Tokens per evaluation window.")
    long_window_tokens: int = Field(
        0, ge=0, le=32768, description="The long-context probe: windows of this many tokens (e.g. 2048, within the "
        "model's context) whose perplexity every cell reports near their start (perplexity_near, the first "
        "eval_window_tokens positions) and far into them (perplexity_far, the second half); 0: no probe.")
    long_windows: int = Field(2, ge=1, le=64, description="Windows of the long-context probe.")

    @model_validator(mode="after")
    def _long(self) -> DataSpec:
        if self.long_window_tokens and self.long_window_tokens < 2 * self.eval_window_tokens:
            raise ValueError(f"long_window_tokens ({self.long_window_tokens}) must be at least twice "
                             f"eval_window_tokens ({self.eval_window_tokens}): its far half starts after the near part")
        return self


# ---- compression steps: the registry's Options models, picked by `method`
def step_options(method: str) -> type:
    return METHODS.options(method)


def step_label(step: dict) -> str:
    """e.g. 'prune_layers-drop4' for {'method': 'prune_layers', 'drop': 4, ...}."""
    label = step_options(step["method"]).label_of(step)
    return f"{step['method']}-{label}" if label else step["method"]


def grid_fields(method: str) -> tuple[str, ...]:
    return step_options(method).GRID


def uses_teacher(method: str) -> bool:
    """Methods that learn from the sweep's base model get it as a dependency."""
    return step_options(method).TEACHER


class Target(Strict):
    name: str = Field(..., pattern=NAME)
    labels: dict[str, str] = Field(
        default_factory=dict, description="Ray label selector: the node labels a benchmark must run on."
    )

    @field_validator("labels")
    @classmethod
    def _keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.match(LABEL_KEY, key):
                raise ValueError(f"label key '{key}' is not a valid Ray/Kubernetes label key")
        return v


class BenchSpec(Strict):
    threads: int | list[int] | None = Field(
        None, description="Threads; default: every CPU of the node. A list (e.g. [1, 2]) measures each, in its "
        "own process, for the thread scaling (decode_tok_s.t<N>, decode_thread_speedup); the largest count is "
        "the cell's headline figure.")
    pinning: Literal["compact", "spread", "none"] = Field(
        "compact", description="Which cores a benchmark's threads are pinned to: 'compact' neighbouring cores "
        "(shared caches), 'spread' one per physical core round-robin over sockets, 'none' no pinning.")
    reuse: Literal["always", "same_host", "never"] = Field(
        "same_host", description="When a resubmitted sweep reuses an earlier benchmark of the same cell and "
        "target: 'same_host' only if it was measured on this very machine (host name, CPU model, cores, "
        "memory), 'always' wherever it was measured, 'never' (measure again in every job). A front then never "
        "mixes machines silently; each cell records when and where it was measured.")
    prompt_tokens: int = Field(128, ge=8, le=8192)
    decode_tokens: int = Field(64, ge=4, le=4096)
    warmup: int = Field(1, ge=0, le=20)
    repeats: int = Field(3, ge=1, le=100)

    @field_validator("threads")
    @classmethod
    def _threads(cls, v):
        levels = v if isinstance(v, list) else [] if v is None else [v]
        if isinstance(v, list) and not v:
            raise ValueError("a thread list needs at least one count, e.g. [1, 2]")
        if any(t < 1 or t > 1024 for t in levels):
            raise ValueError(f"each thread count must be between 1 and 1024; got {v}")
        if isinstance(v, list) and sorted(set(v)) != v:
            raise ValueError(f"thread counts must be distinct and increasing, e.g. [1, 2, 4]; got {v}")
        return v

    def levels(self, cpus: int) -> list[int]:
        """The thread counts to measure on a node of `cpus` CPUs (the default: all of them)."""
        return list(self.threads) if isinstance(self.threads, list) else [self.threads or cpus]


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


def serve_requests(serve: dict, concurrency: int) -> int:
    return serve["requests"] or max(4, 2 * concurrency)


def serve_corpus_tokens(serve: dict) -> int:
    """Corpus tokens a serve benchmark consumes: a warm-up prompt per slot, then distinct prompts for every level
    of both passes (the shared-prefix pass: a fresh prefix per level, then each prompt's own tokens)."""
    p, s, levels = serve["prompt_tokens"], serve["shared_prefix_tokens"], serve["concurrency"]
    n = sum(serve_requests(serve, c) for c in levels)
    return max(levels) * p + n * p + ((len(levels) * s + n * (p - s)) if s else 0)


class TasksSpec(Strict):
    """Task accuracy (farm/tasks.py): lm-eval's multiple-choice tasks scored through each cell's own runtime."""
    items: dict[Literal[tuple(TASKS)], Annotated[int, Field(ge=1)] | Literal["all"]] = Field(  # type: ignore[valid-type]
        ..., min_length=1, description="Items per task, a seeded sample of its validation split (the same items "
        "for every cell), or 'all'; e.g. {piqa: 500, arc_easy: all}.")
    cells: Literal["front", "format_front", "all"] = Field(
        "front", description="After the single-stream phase: 'front' the cells on the sweep's Pareto front (again "
        "until every cell on the front is scored, when a task constraint drops one), plus each runtime's "
        "full-precision base cell (the consistency gate); 'format_front' also the front of each runtime's own cells "
        "(per_runtime of them, the best on promote.metric first), so that every runtime's best quantized cell is "
        "scored; 'all' every cell.")
    per_runtime: int = Field(2, ge=1, le=1000, description="With cells: format_front, at most this many of each "
                             "runtime's own front.")
    seed: int = Field(0, ge=0, description="Seed of the item sample.")
    chat: bool = Field(False, description="Score every prompt as a user message in the model's chat template "
                       "(lm-eval's apply_chat_template), the way an instruction-tuned model is used; false: the "
                       "task's plain prompt.")
    consistency: float = Field(
        0.9, ge=0, le=1, description="The gate: each runtime's full-precision base cell must pick the PyTorch "
        "baseline's answer on at least this share of the items, else every cell of that runtime is kept off the "
        "front (a runtime scoring at chance fails loudly).")


def front_constraints(spec: dict) -> list[dict]:
    """The sweep's constraints as plain dicts, plus the task-accuracy consistency gate when it scores tasks."""
    out = [dict(c) for c in spec.get("constraints") or []]
    if spec.get("tasks"):
        out.append({"metric": "task_consistency", "min": spec["tasks"]["consistency"]})
    return out


class Constraint(Strict):
    metric: Metric
    max: float | None = None
    min: float | None = None
    max_ratio_to_baseline: float | None = Field(None, gt=0)
    min_ratio_to_baseline: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_bound(self) -> Constraint:
        bounds = [self.max, self.min, self.max_ratio_to_baseline, self.min_ratio_to_baseline]
        if all(b is None for b in bounds):
            raise ValueError("give at least one of max, min, max_ratio_to_baseline, min_ratio_to_baseline")
        return self


class PromoteSpec(Strict):
    model_name: str | None = Field(None, pattern=NAME, description="Registered model; default: the sweep name.")
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
    metric: Metric = Field("decode_tok_s", description="Among the Pareto front, the cell best on this metric.")


class Sweep(Strict):
    """The sweep's own sections; `sweep_model()` adds `pipelines` and `exports` typed by the registries."""
    name: str = Field(..., pattern=NAME, description="Also the MLflow experiment name.")
    base: BaseSpec = Field(default_factory=BaseSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    pipelines: list[list[Any]] = Field(
        default_factory=lambda: [[]], min_length=1, description="Compression pipelines; [] is the base model.")
    exports: list[Any] = Field(..., min_length=1)
    targets: list[Target] = Field(default_factory=lambda: [Target(name="any")], min_length=1)
    bench: BenchSpec = Field(default_factory=BenchSpec)
    serve: ServeSpec | None = Field(None, description="Serve benchmark (latency vs throughput under concurrent "
                                    "load); unset: none.")
    tasks: TasksSpec | None = Field(None, description="Task accuracy (lm-eval's ARC, HellaSwag, PIQA, WinoGrande, "
                                    "...) through each cell's runtime; unset: none.")
    objectives: dict[Metric, Literal["min", "max"]] = Field(
        default_factory=lambda: {"perplexity": "min", "decode_tok_s": "max", "size_mb": "min"}, min_length=1
    )
    constraints: list[Constraint] = Field(default_factory=list)
    promote: PromoteSpec = Field(default_factory=PromoteSpec)
    stage_memory_gb: float | None = Field(
        None, gt=0, le=65536,
        description="Memory (GiB) each compress/export/evaluate stage reserves from Ray and may use: one that "
                    "grows past it is stopped and its cells fail with the reason, before it can take the node's "
                    "other work down. Unset: Ray reserves ~3x the float model + 1 GiB and only Ray's node-level "
                    "OOM killer acts.")
    stage_cpus: int = Field(
        1, ge=1, le=1024,
        description="CPUs each compress/export/evaluate stage reserves from Ray, and the threads it then uses. "
                    "1 packs many small stages on a node; raise it for big models on big nodes (benchmarks always "
                    "take their whole node).")

    def metrics_used(self) -> list[str]:
        """Every metric the objectives, constraints and promote policy name."""
        return [*self.objectives, *(c.metric for c in self.constraints), self.promote.metric]

    @model_validator(mode="after")
    def _serve_metrics(self) -> Sweep:
        """A serve metric in the objectives, constraints or promote policy needs every candidate served at that
        level: serve.cells 'all' (the front is only known once they are) and the level in serve.concurrency."""
        used = self.metrics_used()
        for metric in dict.fromkeys(m for m in used if is_serve_metric(m)):
            level = int(re.match(SERVE_METRIC, metric).group(3))
            if self.serve is None or self.serve.cells != "all" or level not in self.serve.concurrency:
                raise ValueError(f"'{metric}' is measured by the serve benchmark at concurrency {level}: it needs "
                                 f"serve: {{cells: all, concurrency: [..., {level}]}} so that every candidate has it")
        return self

    @model_validator(mode="after")
    def _long_metrics(self) -> Sweep:
        used = self.metrics_used()
        if any(m in LONG_METRICS for m in used) and not self.data.long_window_tokens:
            raise ValueError("perplexity_near / perplexity_far come from the long-context probe: set "
                             "data.long_window_tokens (e.g. 2048)")
        return self

    @model_validator(mode="after")
    def _task_metrics(self) -> Sweep:
        """A task metric needs the task scored (and acc_norm one that has it); in the objectives, on every cell."""
        used = self.metrics_used()
        for metric in dict.fromkeys(m for m in used if is_task_metric(m)):
            key, _, task = metric.partition(".")
            if self.tasks is None or (task and task not in self.tasks.items):
                raise ValueError(f"'{metric}' is task accuracy: add tasks: {{items: {{{task or 'piqa'}: 200}}}} to the "
                                 "sweep so that it is measured")
            if key == "acc_norm" and task not in NORMALISED:
                raise ValueError(f"'{metric}': lm-eval scores {task} by acc only (no length-normalised acc_norm)")
            if (metric in self.objectives or metric == self.promote.metric) and self.tasks.cells != "all":
                raise ValueError(f"'{metric}' as an objective or promote metric needs tasks.cells: all (every "
                                 "candidate scored); with cells: front, use it in a constraint")
        return self

    @model_validator(mode="after")
    def _serve_corpus(self) -> Sweep:
        if self.serve is None:
            return self
        need = serve_corpus_tokens(self.serve.model_dump())
        have = self.data.calib_tokens + self.data.eval_windows * self.data.eval_window_tokens
        if need > have:
            raise ValueError(f"serve: its prompts (never repeated, so no cache serves them by accident) take {need} "
                             f"corpus tokens, the data section holds {have}; lower serve.requests / prompt_tokens / "
                             "concurrency, or raise data.calib_tokens")
        return self

    @model_validator(mode="after")
    def _unique_targets(self) -> Sweep:
        names = [t.name for t in self.targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target names must be unique, repeated: {', '.join(dupes)}")
        return self

    @property
    def model_name(self) -> str:
        return self.promote.model_name or self.name


def _union(options: tuple[type, ...], key: str):
    return Annotated[Union[options], Field(discriminator=key)]  # noqa: UP007 (a tuple of types)


@functools.cache
def _sweep_model(versions: tuple[int, int, int]) -> type[Sweep]:
    step = _union(METHODS.all_options(), "method")
    export = _union(FORMATS.all_options(), "format")
    return create_model(
        "Sweep", __base__=Sweep,
        pipelines=(list[list[step]], Field(default_factory=lambda: [[]], min_length=1,
                                           description="Compression pipelines; [] is the base model.")),
        exports=(list[export], Field(..., min_length=1, description="Export formats and their levels.")))


def sweep_model() -> type[Sweep]:
    """The Sweep model with the unions of every registered method and format."""
    return _sweep_model((METHODS.version, FORMATS.version, RUNTIMES.version))


def _runtime_hint(loc: tuple, key: str) -> str:
    """A runtime's option written on the export itself (as `amx:` was before runtimes had names)."""
    fmt = loc[2] if len(loc) == 4 and loc[0] == "exports" and loc[2] in FORMATS else None
    for name in runtimes_for(fmt) if fmt else ():
        if key in RUNTIMES.options(name).model_fields:
            return f"it is an option of the {name} runtime: write runtime: {{name: {name}, {key}: ...}}"
    return "remove it or check its spelling"


def _branch_names() -> set[str]:
    return set(METHODS.names()) | set(FORMATS.names())


def _suggest(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" — did you mean '{close[0]}'?" if close else ""


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _branch_names() or str(part).startswith(("function-", "list[", "int", "str", "bool")):
            continue  # pydantic's union branch names are noise for a user
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _format_error(err: dict) -> str:
    where = _loc(err["loc"])
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "extra_forbidden":  # the last part is the user's key, whatever it is called
        parent, key = _loc(err["loc"][:-1]), err["loc"][-1]
        where = f"{parent}.{key}" if err["loc"][:-1] else str(key)
        return f"{where}: unknown key '{key}' in {parent} — {_runtime_hint(err['loc'], key)}"
    if kind == "union_tag_invalid":
        expected = [e.strip(" '") for e in err["ctx"]["expected_tags"].split(",")]
        tag, key = err["ctx"]["tag"], err["ctx"]["discriminator"].strip("'")
        return f"{where}.{key}: unknown {key} '{tag}'{_suggest(tag, expected)} (allowed: {', '.join(expected)})"
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", err["ctx"]["expected"])
        return f"{where}: {value!r} is not allowed{_suggest(value, expected)} (allowed: {', '.join(expected)})"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        field = re.match(r"^([a-z_]+): ", msg)  # a model-level check names its field first
        if field:
            return f"{where}.{field.group(1)}: {msg[field.end():]}"
        return f"{where}: {msg}"
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    return f"{where}: {msg} (got {shown[:120]})"


def parse(data: Any, source: str = "sweep") -> Sweep:
    """Validate a sweep given as plain data; raise SpecError with one message per problem."""
    if not isinstance(data, dict):
        raise SpecError([f"(top level): expected a mapping of keys, got {type(data).__name__}"], source)
    problems: list[str] = []
    sweep = None
    try:
        sweep = sweep_model().model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            text = _format_error(err)
            if text not in problems:  # a bad key inside a union is reported once, not once per branch
                problems.append(text)
    problems += [p for p in check_world(data) if p not in problems]
    if problems:
        raise SpecError(problems, source)
    return sweep


def load(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"file '{path}' does not exist — give the path of a sweep YAML file"], str(path))
    return loads(path.read_text(encoding="utf-8"), str(path))


def loads(text: str, source: str = "sweep") -> Sweep:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError([f"not valid YAML: {e}"], source) from None
    return parse(data, source)


def _valid(model: type, data: Any):
    """data validated by one plug-in's Options, or None (its errors are the schema check's to report)."""
    try:
        return model.model_validate(data)
    except (ValidationError, ValueError, TypeError):
        return None


def check_world(data: dict) -> list[str]:
    """Checks against the files a sweep names and the shape of its model; cheap, before any task runs.
    Works on the raw data, step by step, so these problems are reported together with the schema's even
    when the schema check failed elsewhere."""
    problems: list[str] = []
    base = data.get("base") if isinstance(data.get("base"), dict) else {}
    ref = base.get("model", BaseSpec().model)
    if not isinstance(ref, str):
        return problems
    kind = model_kind(ref)
    if kind == "unknown":
        problems.append(
            f"base.model: '{ref}' is not an embedded model{_suggest(ref, EMBEDDED_MODELS)}, an existing "
            f"directory, or a hub id 'org/name' (embedded: {', '.join(EMBEDDED_MODELS)})"
        )
    elif kind == "local":
        trust = bool(base.get("trust_remote_code"))
        problems += [f"base.model: {p}" for p in model_dir_problems(Path(ref).expanduser(), trust)]
    files = (data.get("data") or {}).get("files") if isinstance(data.get("data"), dict) else None
    for i, f in enumerate(files if isinstance(files, list) else []):
        if isinstance(f, str) and not Path(f).expanduser().is_file():
            problems.append(f"data.files[{i}]: file '{f}' does not exist")
    shape0 = ModelShape.of(base_config(ref))
    d = data.get("data") if isinstance(data.get("data"), dict) else {}
    calib_tokens = d.get("calib_tokens", DataSpec().calib_tokens)
    pipelines = data.get("pipelines") if isinstance(data.get("pipelines"), list) else []
    for i, pipeline in enumerate(pipelines):
        shape = shape0  # the model entering each step (the largest of a grid)
        for j, step in enumerate(pipeline if isinstance(pipeline, list) else []):
            method = step.get("method") if isinstance(step, dict) else None
            opt = _valid(step_options(method), step) if method in METHODS else None
            if opt is not None:
                found, shape = opt.check(shape)
                found += calibration_problems(opt, calib_tokens)
                problems += [f"pipelines[{i}][{j}].{p}" for p in found]
    exports = data.get("exports") if isinstance(data.get("exports"), list) else []
    for i, e in enumerate(exports):
        fmt = e.get("format") if isinstance(e, dict) else None
        opt = _valid(FORMATS.options(fmt), e) if fmt in FORMATS else None
        if opt is not None and isinstance(calib_tokens, int):
            problems += [f"exports[{i}].{p}" for p in opt.check(shape0, calib_tokens)]
    return problems


def calibration_problems(opt, calib_tokens) -> list[str]:
    """A step that reads calib_samples x seq_len tokens needs that much calibration text: it is refused
    here rather than quietly given fewer samples than the sweep says."""
    need = getattr(opt, "calib_samples", 0) * getattr(opt, "seq_len", 0) if isinstance(opt, Calibrated) else 0
    if not isinstance(calib_tokens, int) or need <= calib_tokens:
        return []
    return [f"calib_samples: {opt.calib_samples} x seq_len {opt.seq_len} = {need} calibration tokens, but "
            f"data.calib_tokens is {calib_tokens}; raise data.calib_tokens or lower calib_samples/seq_len"]


def json_schema() -> dict:
    return sweep_model().model_json_schema()
