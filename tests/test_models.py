"""Malformed model directories get clear errors, before any task runs where possible."""

import json
import shutil

import pytest

from farm.errors import ModelError, SpecError
from farm.inputs.models import check_dir
from farm.sweep import spec


def sweep_for(d):
    return {"name": "m", "base": {"model": str(d)}, "exports": [{"format": "gguf", "quant": "F16"}]}


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    return d


def test_a_good_directory_passes(model_copy):
    assert check_dir(model_copy) == model_copy
    spec.parse(sweep_for(model_copy))


def test_no_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(SpecError, match="has no config.json"):
        spec.parse(sweep_for(model_copy))
    with pytest.raises(ModelError, match="no config.json"):
        check_dir(model_copy)


def test_pickle_only_checkpoint(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(SpecError, match=r"pickle checkpoints \['pytorch_model.bin'\]: re-save them with safetensors"):
        spec.parse(sweep_for(model_copy))
    with pytest.raises(ModelError, match="pickle checkpoints"):
        check_dir(model_copy)


def test_tokenizer_missing(model_copy):
    (model_copy / "tokenizer.json").unlink()
    spec.parse(sweep_for(model_copy))  # tokenizer.model alone is a tokenizer
    (model_copy / "tokenizer.model").unlink()
    with pytest.raises(SpecError, match="has no tokenizer"):
        spec.parse(sweep_for(model_copy))


def test_custom_code_needs_an_explicit_opt_in(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="trust_remote_code: true"):
        spec.parse(sweep_for(model_copy))
    opted = sweep_for(model_copy)
    opted["base"]["trust_remote_code"] = True
    assert spec.parse(opted).base.trust_remote_code


def test_hub_ids_resolve_through_the_hub_cache(tiny_model_dir, tmp_path):
    """The hub path is real: snapshot_download, here answered offline from a Hugging Face cache laid out
    as the hub writes it (models--org--name/refs/main -> snapshots/<commit>/). Run in a fresh process:
    huggingface_hub reads HF_HUB_CACHE when it is imported."""
    import os
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("from farm.inputs.models import resolve\nfrom farm.errors import ModelError\nprint(resolve('acme/tiny-llama'))\n"
            "try:\n    resolve('acme/not-cached')\nexcept ModelError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                         timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr[-2000:]
    assert lines[0].endswith(f"snapshots/{commit}")
    assert lines[1].startswith("ERR base.model: could not fetch hub model 'acme/not-cached'")
