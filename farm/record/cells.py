"""A cell's MLflow run as one plain JSON record (so it can wait on disk for the server): its flattened spec as
params, every single-stream measurement's metrics, what each measurement kind adds (farm/stages/<kind>.py:
record), what its compression steps did, and the node it was measured on."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from farm import storage
from farm.stages import CHAIN, STAGES
from farm.sweep.spec import step_label

EXPORT = CHAIN[-1]  # the stage whose artifact a cell's run points at


def step_metrics(steps: list[dict | None]) -> tuple[dict[str, float], dict[str, list]]:
    """What the cell's compression steps did, as MLflow metrics: each step's numeric info as
    '<method>.<key>' ('<method>_2.<key>' for a second step of the same method), and its training curve as
    histories '<method>.train_loss' / '<method>.val_loss' ([step, value] pairs)."""
    scalars: dict[str, float] = {}
    history: dict[str, list] = {}
    seen: dict[str, int] = {}
    for result in steps:
        if not result:
            continue
        method = result.get("params", {}).get("step", {}).get("method", "step")
        seen[method] = seen.get(method, 0) + 1
        name = method if seen[method] == 1 else f"{method}_{seen[method]}"  # MLflow names allow no '#'
        info = result.get("info") or {}
        scalars.update({f"{name}.{k}": float(v) for k, v in info.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for key, points in (info.get("curve") or {}).items():
            pairs = [p if isinstance(p, list) else [i, p] for i, p in enumerate(points, 1)]
            history[f"{name}.{key}"] = [[int(st), float(v)] for st, v in pairs]
    return scalars, history


def step_adapters(steps: list[dict | None]) -> dict[str, Path]:
    """The unmerged adapters the cell's compression steps kept for llama.cpp (an sft step's adapter GGUF), by
    the folder of the cell's run they go to: 'adapter' ('adapter_2' for a second such step)."""
    out: dict[str, Path] = {}
    for result in steps:
        rel = ((result or {}).get("info") or {}).get("adapter_gguf")
        if rel and result.get("model_dir"):
            out["adapter" if not out else f"adapter_{len(out) + 1}"] = Path(result["model_dir"]).parent / rel
    return out


def cell_record(experiment_id: str, parent_id: str, cell, export: dict | None, results: dict[str, dict | None],
                error: BaseException | None, error_text: str | None, steps: list[dict | None] = ()) -> dict:
    """Everything a cell's run holds. results: the single-stream measurements' results by kind."""
    label = cell_label(cell)
    tags = {"mlflow.parentRunId": parent_id, "farm.kind": "cell", "farm.cell_id": cell.id,
            "farm.baseline": str(cell.baseline).lower(), "farm.label": label}
    metrics, history = step_metrics(list(steps))
    for result in results.values():
        metrics.update({k: float(v) for k, v in ((result or {}).get("metrics") or {}).items()})
    if export:
        tags.update({"farm.artifact_uri": storage.uri_of(export["artifact"]),
                     "farm.artifact_format": export["format"], "farm.artifact_sha256": export.get("sha256", ""),
                     "farm.artifact_runtime": json.dumps(cell.spec["export"]["runtime"], sort_keys=True),
                     "farm.export_stage": export.get("stage", "")})
        # a full-precision export checked against its checkpoint (farm/measure/fidelity.py)
        tags.update({f"farm.{k}": f"{export[k]:.3g}" for k in ("fidelity_rel_err", "fidelity_kl", "fidelity_top1")
                     if k in export})
        pins = export.get("pins") or {}  # a remote store: the manifests promote fetches against
        for tag, stage in (("farm.export_manifest", export.get("stage")),
                           ("farm.artifact_manifest", storage.stage_of(export["artifact"]))):
            if pins.get(stage):
                tags[tag] = pins[stage]
    for kind, result in ((EXPORT, export), *results.items()):
        if result:  # reused from an earlier submission (same content id) rather than run again
            tags[f"farm.cached.{kind}"] = str(result.get("cached", False)).lower()
    files = {"cell_spec.json": {"id": cell.id, "baseline": cell.baseline, **cell.spec},
             "stages.json": {k: v for k, v in ((EXPORT, export), *results.items()) if v}}
    for kind, result in results.items():
        hook = getattr(STAGES.get(kind), "record", None)
        if result and hook:
            extra = hook(result, label)
            tags.update(extra.get("tags", {}))
            files.update(extra.get("files", {}))
    flags = [r for r in results.values() if r]
    if flags:  # what the front reads whatever measured it: disturbed by other load, where and when
        tags["farm.contaminated"] = str(any(r.get("contaminated") for r in flags)).lower()
        when = next((r["measured_at"] for r in flags if r.get("measured_at")), None)
        if when:
            tags["farm.measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    adapters = {d: str(p) for d, p in step_adapters(list(steps)).items() if p.is_file()}
    for d, p in adapters.items():  # `farm serve --lora runs:/RUN/adapter/adapter-f16.gguf` (or models:/...)
        tags[f"farm.{d}"] = f"{d}/{Path(p).name}"
        tags[f"farm.{d}_sha256"] = storage.sha256(Path(p))
    failed = error is not None or bool(error_text)
    if failed:
        text = error_text or ((getattr(error, "report", "") or "") + "\n\n--- traceback ---\n"
                              + "".join(traceback.format_exception(error))).lstrip()
        files["error.txt"] = text
        tags["farm.error"] = ((str(error) or type(error).__name__) if error is not None
                              else next((ln for ln in reversed(text.splitlines()) if ln.strip()), "failed"))[:4000]
    return {"op": "cell", "experiment_id": experiment_id, "parent_id": parent_id, "cell_id": cell.id,
            "run_name": label, "run_id": None, "attempts": 0, "tags": {k: str(v) for k, v in tags.items()},
            "params": {k: v[:6000] for k, v in cell.params().items()}, "metrics": metrics, "files": files,
            "artifacts": adapters,
            "history": history, "logged_at": int(time.time() * 1000), "status": "FAILED" if failed else "FINISHED"}


def cell_label(cell) -> str:
    p = cell.params()
    steps = "+".join(step_label(s) for s in cell.spec["compress"]) or "base"
    export = f"{p['export.format']}-{p['export.quant']}"
    if p.get("export.algorithm", "rtn") != "rtn":
        export += f"-{p['export.algorithm']}"
    if "export.group_size" in p:
        export += f"-g{p['export.group_size']}"
    if p.get("export.ratio", "1.0") != "1.0":
        export += f"-r{p['export.ratio']}"
    if p.get("export.builder"):
        export += f"-{p['export.builder']}"
    runtime = cell.spec["export"].get("runtime")
    if runtime:  # the runtime, when not the format's own, and its options that differ from their defaults
        from farm.export import FORMATS
        from farm.runtimes import RUNTIMES

        if runtime["name"] != FORMATS.options(cell.spec["export"]["format"]).RUNTIME:
            export += f"-{runtime['name']}"
        tags = RUNTIMES.options(runtime["name"]).label_of(runtime)
        export += f"-{tags}" if tags else ""
    return f"{steps}/{export}@{p['target.name']}"


def row(id: str, params: dict[str, str], baseline: bool, metrics: dict, label: str, contaminated: bool = False,
        failed_later: list[str] = (), measured_at: str = "", hostname: str = "") -> dict:
    """One cell's results as the front, the report and promote read them, whether built from the job's own stage
    results (the driver) or read back from MLflow (farm.record.queries.cell_rows). params: the cell's flat params;
    failed_later: the later-phase kinds that failed for it (their metrics then count as missing)."""
    return {"id": id, "target": params.get("target.name", ""), "baseline": baseline, "metrics": dict(metrics),
            "label": label, "contaminated": contaminated, "failed_later": list(failed_later),
            "format": params.get("export.format", ""), "quant": params.get("export.quant", ""),
            "runtime": params.get("export.runtime.name", ""), "pipeline": params.get("compress.method", "none"),
            "algorithm": params.get("export.algorithm"), "group_size": params.get("export.group_size"),
            "measured_at": measured_at, "hostname": hostname}
