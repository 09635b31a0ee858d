"""The base model: resolved once per sweep (an embedded model, a local directory or a hub id) and, with a remote
store, copied there so that every node opens the same files."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from farm import storage
from farm.plugin import Strict

KIND = "base"
SECTION = "base"
PATHS = ("model_dir",)


class BaseSpec(Strict):
    model: str = Field(
        "smollm2-135m-instruct",
        description="An embedded model name, a local Hugging Face directory, or a hub id 'org/name'.",
    )
    revision: str | None = Field(None, description="Hub revision (hub ids only).")
    trust_remote_code: bool = Field(
        False, description="Run the model's own Python code (auto_map in config.json). Off unless you trust it."
    )


Config = BaseSpec  # the section's model, as every stage kind names it


def code(params: dict) -> list[str]:
    return ["farm.inputs.models"]


def run(stage, deps: list[dict], out: Path) -> dict:
    from farm.errors import ModelError
    from farm.inputs.modelref import contents, model_kind
    from farm.inputs.models import resolve

    ref, revision = stage.params["model"], stage.params.get("revision")
    # a hub id is fetched at the commit the sweep's id holds, whatever its revision names by now
    model_dir = resolve(ref, stage.params["contents"] if model_kind(ref) == "hub" else revision)
    if contents(ref, revision) != stage.params["contents"]:
        raise ModelError(f"base.model '{stage.params['model']}' changed after the sweep was submitted (its files or "
                         "the commit its revision names); submit the sweep again so that every stage is built from "
                         "what it holds now")
    if storage.url():  # other nodes may lack the model (a local path, this node's hub cache): it travels
        storage.copy_tree(model_dir, out / "model")
        return {"model_dir": "model", "source": str(model_dir)}
    return {"model_dir": str(model_dir)}
