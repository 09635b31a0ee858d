"""Checks of a sweep against the world, cheap and before any task runs: the files it names exist, its model is
one farm can open, each step fits the shape of the model entering it (and, for a step that learns from data, what
the sweep scores: StepOptions.with_scored), and the calibration text suffices.
Works on the raw data, step by step, so these problems are reported together with the schema's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from farm.compress import METHODS
from farm.export import FORMATS
from farm.inputs.modelref import EMBEDDED_MODELS, ModelShape, base_config, model_dir_problems, model_kind
from farm.plugin import Calibrated
from farm.stages.base import Config as BaseConfig
from farm.stages.common import scored_tasks
from farm.stages.reference import Config as DataConfig
from farm.sweep.messages import _suggest


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
    ref = base.get("model", BaseConfig().model)
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
    calib_tokens = d.get("calib_tokens", DataConfig().calib_tokens)
    pipelines = data.get("pipelines") if isinstance(data.get("pipelines"), list) else []
    scored = scored_tasks(data)  # what a step's data is checked against (farm.plugin.StepOptions.with_scored)
    for i, pipeline in enumerate(pipelines):
        shape = shape0  # the model entering each step (the largest of a grid)
        for j, step in enumerate(pipeline if isinstance(pipeline, list) else []):
            method = step.get("method") if isinstance(step, dict) else None
            options = METHODS.options(method) if method in METHODS else None
            opt = _valid(options, options.with_scored(step, scored)) if options else None
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
