"""Promote a cell: log its exported model as an MLflow pyfunc model in the cell's run, register it as a
new version of a registered model, and point an alias (default `champion`) at that version.

`mlflow.pyfunc.load_model("models:/demo@champion").predict(["Once upon a time"])` then generates
text with the runtime that was measured (llama.cpp, ONNX Runtime, OpenVINO, or PyTorch for the baseline).
The version's files (its pickled model among them) get a checksum, farm.model_sha256, which `farm generate`
and `farm serve --mlflow` check before MLflow unpickles anything.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
from mlflow.models import infer_signature

from farm import storage
from farm.decide.deploy import MODEL_SHA256, files_sha256, verified_model
from farm.errors import FarmError
from farm.export import FORMATS
from farm.record import outbox

# a stage's name in storage: farm.plan.grid.Stage.name (<kind>-<content id>), with a machine's or job's key after
# '@' for a benchmark (farm.stages.runner.storage_name)
STAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*-[0-9a-f]{12}(@[0-9a-f]{10})?")


def requirements(runtime: str) -> list[str]:
    """What a promoted model needs to run, beyond farm's own code (the pyfunc's pip requirements): the
    runtime's REQUIREMENTS at the versions installed here."""
    from farm.plan.codeid import distribution_version
    from farm.runtimes import RUNTIMES

    return [f"{n}=={distribution_version(n)}" for n in RUNTIMES.options(runtime).REQUIREMENTS]


class FarmLLM(mlflow.pyfunc.PythonModel):
    """Greedy text generation from an exported farm artifact."""

    def load_context(self, context):
        import json

        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        from farm.runtimes import load

        runtime = meta.get("runtime") or FORMATS.options(meta["format"]).RUNTIME  # promoted before runtimes had names
        self.runtime = load(runtime, context.artifacts["model"], threads=meta.get("threads", 2),
                            n_ctx=meta.get("n_ctx", 2048))

    def predict(self, context, model_input, params=None):
        max_tokens = int((params or {}).get("max_tokens", 48))
        if isinstance(model_input, str):
            prompts = [model_input]
        elif hasattr(model_input, "columns"):  # a DataFrame
            col = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[col]]
        else:
            prompts = [str(p) for p in model_input]
        return [self.runtime.generate(p, max_tokens=max_tokens) for p in prompts]


def promote(name: str, run_id: str | None = None, model_name: str | None = None, alias: str | None = None,
            sweep_run: str | None = None) -> dict:
    from farm.decide.report import front_of

    report = front_of(name, sweep_run)
    policy = report["spec"]["promote"]
    c = outbox.client()
    if run_id is None:
        if report["best"] is None:
            raise FarmError(f"sweep '{name}' has no cell on the Pareto front to promote — see `farm pareto {name}`")
        run_id = report["best"]["id"]
    run = c.get_run(run_id)
    if run.info.status != "FINISHED" or "farm.artifact_uri" not in run.data.tags:
        raise FarmError(f"run {run_id} is not a finished farm cell run")
    recorded = _export_record(run)
    if storage.uri_of(recorded["artifact"]) != run.data.tags["farm.artifact_uri"] or \
            recorded.get("sha256", "") != run.data.tags.get("farm.artifact_sha256", ""):
        raise FarmError(f"run {run_id}'s artifact tags do not match what its export stage "
                        f"{run.data.tags['farm.export_stage']} recorded in storage; not promoting")
    artifact = storage.local_path(run.data.tags["farm.artifact_uri"], run.data.tags.get("farm.artifact_manifest") or None)
    if not artifact.exists():
        raise FarmError(f"the exported model {artifact} of run {run_id} is gone from storage — rerun the sweep")
    want = run.data.tags.get("farm.artifact_sha256")
    if not want:
        raise FarmError(f"run {run_id} records no checksum of its artifact, so what would be registered cannot be "
                        "shown to be what was measured; not promoting — rerun the sweep")
    if storage.sha256(artifact) != want:
        raise FarmError(f"checksum mismatch for {artifact}: it changed since it was measured; not promoting")
    runtime = json.loads(run.data.tags["farm.artifact_runtime"])  # the runtime and options it was measured with
    model_name = model_name or policy.get("model_name") or name
    alias = alias or policy.get("alias") or "champion"
    out = {"run_id": run_id, "model_name": model_name, "alias": alias, "uri": f"models:/{model_name}@{alias}",
           "label": run.data.tags.get("farm.label", ""), "tracking_uri": mlflow.get_tracking_uri(),
           "table": report["table"]}
    identity = {"farm.artifact_uri": run.data.tags["farm.artifact_uri"], "farm.artifact_sha256": want or ""}
    current = _version_by_alias(c, model_name, alias)
    if current is not None and current.tags.get(MODEL_SHA256) and \
            all(current.tags.get(k) == v for k, v in identity.items()):
        # a resubmitted sweep picked the very same artifact: the alias already points at it
        return {**out, "version": current.version, "unchanged": True}
    meta = storage.home() / "promote" / f"{run_id}.json"
    # served as measured: the cell's runtime and options, and the threads its benchmark ran with
    threads = run.data.tags.get("farm.bench.threads", "")
    served = {"runtime": runtime, "threads": int(threads) if threads.isdigit() else 2, "n_ctx": 2048}
    storage.atomic_write_text(meta, json.dumps(served))
    reqs = requirements(runtime["name"])
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=FarmLLM(), artifacts={"model": str(artifact), "meta": str(meta)},
            code_paths=[str(Path(__file__).parent.parent)], pip_requirements=reqs,
            signature=infer_signature(["a prompt"], ["a completion"], params={"max_tokens": 48}),
        )
    version = mlflow.register_model(info.model_uri, model_name, tags={**identity, "farm.label": out["label"]})
    with tempfile.TemporaryDirectory(prefix="farm-promote-") as d:  # what `farm serve --mlflow`/`generate` check
        c.set_model_version_tag(model_name, version.version, MODEL_SHA256,
                                files_sha256(f"models:/{model_name}/{version.version}", Path(d)))
    c.update_model_version(model_name, version.version, description=provenance(name, run, report))
    c.set_registered_model_alias(model_name, alias, version.version)
    c.set_tag(run_id, "farm.promoted", f"{model_name}@{alias} v{version.version}")
    return {**out, "version": version.version, "unchanged": False}


def provenance(name: str, run, report: dict) -> str:
    """Where a registered version's numbers came from: the sweep, the cell, what was measured, where and when."""
    m, t = run.data.metrics, run.data.tags

    def num(k: str, f: str) -> str:
        return format(m[k], f) if k in m else "-"
    return (f"Cell `{t.get('farm.label', '')}` of sweep `{name}` (parent run {report['parent']}, cell run "
            f"{run.info.run_id}), promoted by `{report['spec']['promote']['metric']}` from the Pareto front. "
            f"Perplexity {num('perplexity', '.3f')}, KL {num('kl_div', '.4f')}, task accuracy "
            f"{num('task_acc_mean', '.3f')}; decode {num('decode_tok_s', '.1f')} tok/s, prefill "
            f"{num('prefill_tok_s', '.0f')} tok/s, TTFT {num('ttft_ms', '.0f')} ms with "
            f"{t.get('farm.bench.threads', '?')} threads ({num('speedup_vs_torch', '.2f')}x PyTorch fp32, "
            f"{num('speedup_vs_best_fp32', '.2f')}x the fastest fp32 cell, {num('roofline_efficiency', '.0%')} of "
            f"the memory roofline), measured on {t.get('farm.hostname', '?')} ({t.get('farm.cpu_model', '?')}) at "
            f"{t.get('farm.bench.measured_at', '?')} UTC; artifact sha256 {t.get('farm.artifact_sha256', '')[:16]}…")


def _export_record(run) -> dict:
    """What the cell's export stage recorded in the sweep's storage (its artifact and checksum): the authority
    the run's MLflow tags, which anyone who can edit tags could change, are checked against."""
    from farm.stages.runner import stored_result

    stage = run.data.tags.get("farm.export_stage", "")
    if stage and not STAGE_NAME.fullmatch(stage):  # it becomes a path component in storage: a plain name only
        raise FarmError(f"run {run.info.run_id}'s tag farm.export_stage {stage!r} is not a stage name "
                        "(<kind>-<12 hex digits>); not promoting")
    result = stored_result(stage, run.data.tags.get("farm.export_manifest") or None) if stage else None
    if result is None:
        raise FarmError(f"run {run.info.run_id} names no export stage in this storage ({storage.root()}); set "
                        "FARM_STORAGE to the sweep's store, or rerun the sweep")
    return result


def _version_by_alias(c, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(model_name, alias)
    except MlflowException:  # no such model or alias yet
        return None


def generate(uri: str, prompts: list[str], max_tokens: int = 48) -> list[str]:
    """Text from a registered version, loaded only once its files match the checksum recorded at promotion."""
    outbox.client()
    with tempfile.TemporaryDirectory(prefix="farm-generate-") as d:
        model = mlflow.pyfunc.load_model(str(verified_model(uri, Path(d) / "model")))
        return model.predict(prompts, params={"max_tokens": max_tokens})
