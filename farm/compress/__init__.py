"""Compression methods. The `method` of a step in the sweep picks one; each module has

    apply(model_dir: Path, step: dict, calib: np.ndarray, out: Path, threads: int) -> dict

(methods that learn from the sweep's base model as teacher also take `teacher_dir`; spec.TEACHER lists them)

which writes a Hugging Face directory to `out` and returns what it did (logged as the stage's info).
Adding a method: one module here, one line below, one pydantic model in farm/spec.py, one test.
"""

from farm.registry import Registry

METHODS = Registry(
    "compression method",
    {
        "none": "farm.compress.none:apply",
        "prune_layers": "farm.compress.prune_layers:apply",
        "prune_mlp": "farm.compress.prune_mlp:apply",
        "distill": "farm.compress.distill:apply",
        "lora": "farm.compress.lora:apply",
        "gqa": "farm.compress.gqa:apply",
        "prune_heads": "farm.compress.prune_heads:apply",
        "sparsify": "farm.compress.sparsify:apply",
        "gptq": "farm.compress.gptq:apply",
        "awq": "farm.compress.awq:apply",
        "smoothquant": "farm.compress.smoothquant:apply",
    },
)


def run_method(method: str, model_dir, step: dict, calib, out, threads: int, teacher_dir=None) -> dict:
    """Apply one step given as plain data (as a sweep file holds it) — what stages and tests call."""
    extra = {"teacher_dir": teacher_dir} if teacher_dir is not None else {}
    return METHODS.get(method)(model_dir, {"method": method, **step}, calib, out, threads, **extra)
