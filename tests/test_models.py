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


def test_python_files_in_a_model_directory_need_the_opt_in_too(model_copy):
    """llama.cpp's converter and ONNX Runtime GenAI's builder may import a directory's Python (AutoTokenizer with
    trust_remote_code) without any auto_map in config.json: a tokenizer's auto_map or a bare *.py is code."""
    (model_copy / "tokenization_evil.py").write_text("import os; os.system('touch /tmp/pwned')\n")
    with pytest.raises(SpecError, match=r"ships its own Python code \(tokenization_evil.py\)"):
        spec.parse(sweep_for(model_copy))
    (model_copy / "tokenization_evil.py").unlink()
    tok = json.loads((model_copy / "tokenizer_config.json").read_text())
    (model_copy / "tokenizer_config.json").write_text(json.dumps({**tok, "auto_map": {"AutoTokenizer": ["x.Y", None]}}))
    with pytest.raises(SpecError, match=r"ships its own Python code \(tokenizer_config.json\)"):
        spec.parse(sweep_for(model_copy))


def test_a_link_out_of_the_model_directory_is_refused(model_copy, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not a model file")
    (model_copy / "notes.txt").symlink_to(secret)
    with pytest.raises(SpecError, match=r"notes.txt' is a link out of the model directory"):
        spec.parse(sweep_for(model_copy))
    (model_copy / "notes.txt").unlink()
    (model_copy / "inside.json").symlink_to(model_copy / "config.json")  # a link inside is fine
    spec.parse(sweep_for(model_copy))


def test_truncated_safetensors_are_refused_at_validation(model_copy):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(SpecError, match=r"model.safetensors': truncated: \d+ bytes, its header needs \d+"):
        spec.parse(sweep_for(model_copy))
    weights.write_bytes(b"\x00" * 4)
    with pytest.raises(SpecError, match="not a safetensors file"):
        spec.parse(sweep_for(model_copy))


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
