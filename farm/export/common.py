"""What export formats share: the options base an exporter's `Options` extends (torch-free: the spec
imports it), the block-wise int4 options of the ONNX and OpenVINO levels, and the side files (config,
tokenizer) an exported model carries.

A format declares on its Options: LEVELS (its quantization levels), DIRECT (levels written straight from
a Hugging Face directory; every other level is made from the BASE_LEVEL export, which is shared) and
RUNTIME (the runtime that runs it unless the sweep says otherwise). Any runtime whose Options.FORMATS names
the format can run it; an export entry's `runtime` picks: a name, {name: ..., <that runtime's options>}, or
a list of those (each is measured).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from farm.inputs.modelref import ModelShape
from farm.plugin import Options, Problems, as_list, group_problems
from farm.registry import suggest

SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")


@dataclass(frozen=True)
class Variant:
    """One export the grid makes: its params, the shared export it starts from (None: the Hugging Face
    directory), and whether it reads the calibration text."""
    params: dict
    source: dict | None
    calibrated: bool


def check_choices(values: list, allowed: tuple, what: str, field: str = "") -> None:
    """field: named in the message (model-level checks); a field validator's error already carries it."""
    prefix = f"{field}: " if field else ""
    if not values:
        raise ValueError(f"{prefix}give at least one value")
    for v in values:
        if v not in allowed:
            raise ValueError(f"{prefix}'{v}' is not {what}{suggest(str(v), list(allowed))} "
                             f"(allowed: {', '.join(allowed)})")


class ExportOptions(Options):
    LEVELS: ClassVar[tuple[str, ...]] = ()
    DIRECT: ClassVar[tuple[str, ...]] = ()
    BASE_LEVEL: ClassVar[str | None] = None
    # levels converted without quantizing: checked against their checkpoint's logits (farm/measure/fidelity.py)
    FULL_PRECISION: ClassVar[tuple[str, ...]] = ()
    RUNTIME: ClassVar[str] = ""
    quant: str | list[str] = Field(..., description="Quantization level(s) of this format; a list is a grid.")
    runtime: Any = Field(None, description="The runtime(s) that run this export: a name, {name: ..., options}, "
                         "or a list of them (each is measured); default: the format's first runtime.")

    @field_validator("quant")
    @classmethod
    def _levels(cls, quant):
        check_choices(as_list(quant), cls.LEVELS, f"a level of format '{cls.name()}'")
        return quant

    @model_validator(mode="after")
    def _runtimes(self):
        self.runtimes()  # raises with the field's name
        return self

    @classmethod
    def name(cls) -> str:
        return cls.model_fields["format"].annotation.__args__[0]

    def levels(self) -> list[str]:
        return as_list(self.quant)

    def runtimes(self) -> list[dict]:
        """Every runtime setting this export is measured with: {'name': ..., <its options>}, grids expanded."""
        from farm.runtimes import RUNTIMES, runtimes_for

        out = []
        for r in as_list(self.runtime) if self.runtime is not None else [self.RUNTIME]:
            r = {"name": r} if isinstance(r, str) else r
            if not isinstance(r, dict) or not isinstance(r.get("name"), str):
                raise ValueError(f"runtime: give a runtime name or {{name: ..., options}}, got {r!r}")
            check_choices([r["name"]], runtimes_for(self.name()), f"a runtime of format '{self.name()}'", "runtime")
            try:
                out += RUNTIMES.options(r["name"]).model_validate(r).expand()
            except ValueError as e:  # pydantic's ValidationError: name the runtime's own field
                raise ValueError(f"runtime: {r['name']}: {_first_error(e)}") from None
        return out

    def params(self, quant: str) -> list[dict]:
        """The export parameter sets of one level, holding only what that level reads."""
        return [{"format": self.name(), "quant": quant}]

    def source(self, params: dict) -> dict | None:
        if params["quant"] in self.DIRECT:
            return None
        return {"format": self.name(), "quant": self.BASE_LEVEL}

    def variants(self) -> list[Variant]:
        return [Variant(p, self.source(p), self.calibrated(p)) for q in self.levels() for p in self.params(q)]

    def calibrated(self, params: dict) -> bool:
        return False

    def check(self, shape: ModelShape, calib_tokens: int) -> Problems:
        """Problems with this export on a model of this shape and that much calibration text."""
        return []


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return str(e)
    err = errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg'].removeprefix('Value error, ')}" if where else err["msg"]


class BlockwiseExport(ExportOptions):
    """A format whose int4 levels (GROUPED) quantize block-wise, `group_size` weights per scale, by one of
    ALGORITHMS; those in DATA_AWARE read the calibration text."""
    GROUPED: ClassVar[tuple[str, ...]] = ()
    ALGORITHMS: ClassVar[tuple[str, ...]] = ("rtn",)
    DATA_AWARE: ClassVar[tuple[str, ...]] = ()
    algorithm: str | list[str] = Field(
        "rtn", description="The algorithm of the int4 levels (data-aware ones read the calibration text); a list "
        "is a grid.")
    group_size: int = Field(64, ge=16, le=4096, description="Weights per scale in block-wise levels (power of 2).")
    calib_samples: int = Field(16, ge=1, le=1024, description="Calibration sequences for data-aware algorithms.")
    calib_seq_len: int = Field(256, ge=16, le=8192, description="Tokens per calibration sequence.")

    @field_validator("group_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two (16, 32, 64, 128, ...), got {v}")
        return v

    @model_validator(mode="after")
    def _algorithms(self):
        algs = as_list(self.algorithm)
        if algs != ["rtn"]:
            check_choices(algs, self.ALGORITHMS, f"an algorithm of format '{self.name()}'", "algorithm")
            if not any(self.is_int4(q) for q in self.levels()):
                raise ValueError(f"algorithm: {algs} applies to int4 levels only, and quant has none")
        return self

    def is_int4(self, quant: str) -> bool:
        return quant.startswith("int4")

    def params(self, quant: str) -> list[dict]:
        out = []
        for alg in as_list(self.algorithm) if self.is_int4(quant) else [None]:
            p: dict = {"format": self.name(), "quant": quant}
            if quant in self.GROUPED:
                p["group_size"] = self.group_size
            if alg is not None:
                p["algorithm"] = alg
            if alg in self.DATA_AWARE:
                p.update(calib_samples=self.calib_samples, calib_seq_len=self.calib_seq_len)
            out.append(p)
        return out

    def calibrated(self, params: dict) -> bool:
        return params.get("algorithm") in self.DATA_AWARE

    def check(self, shape: ModelShape, calib_tokens: int) -> Problems:
        problems = []
        if any(q in self.GROUPED for q in self.levels()):
            problems += group_problems(self.group_size, shape)
        aware = [a for a in as_list(self.algorithm) if a in self.DATA_AWARE]
        need = self.calib_samples * self.calib_seq_len
        if aware and need > calib_tokens:
            problems.append(f"calib_samples: the data-aware algorithm(s) {aware} need {self.calib_samples} x "
                            f"{self.calib_seq_len} = {need} calibration tokens but data.calib_tokens is "
                            f"{calib_tokens}; raise data.calib_tokens or lower calib_samples/calib_seq_len")
        return problems


def copy_side_files(src: Path, out: Path) -> None:
    """The config and tokenizer files an exported model needs beside its weights."""
    for name in SIDE_FILES:
        if (src / name).is_file() and not (out / name).is_file():
            shutil.copy2(src / name, out / name)


# ---- what a decode step reads (the memory roofline, farm/measure/roofline.py): shared by the formats' readers
GATHERS = {"Gather", "GatherBlockQuantized"}  # ops that read one row of a table per token
PASSES = ("Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Cast",
          "DequantizeLinear", "Mul", "Sub", "Identity")  # decompression ops between a stored weight and its user


def terminal(start, consumers, op_type) -> set[str]:
    """The op types that finally use a stored weight, looking through decompression ops."""
    seen, todo, out = set(), [start], set()
    while todo:
        node = todo.pop()
        for user in consumers(node):
            t = op_type(user)
            if t in PASSES and id(user) not in seen:
                seen.add(id(user))
                todo.append(user)
            elif t not in PASSES:
                out.add(t)
    return out


def hf_shape(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    heads = cfg.get("num_attention_heads")
    return {"layers": cfg.get("num_hidden_layers"), "kv_heads": cfg.get("num_key_value_heads") or heads,
            "head_dim": cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else None),
            "tied": bool(cfg.get("tie_word_embeddings"))}
