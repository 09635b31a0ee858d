"""Compression methods. The `method` of a step in the sweep picks one; each module defines

    class Options(farm.plugin.StepOptions)  # method: Literal["<name>"], its fields, label, grid and check
    apply(model_dir: Path, opt: Options, calib: np.ndarray, out: Path, threads: int) -> dict

(methods that learn from the sweep's base model as teacher, Options.TEACHER, also take `teacher_dir`),
which writes a Hugging Face directory to `out` and returns what it did (logged as the stage's info).
What methods share (loading, calibration batches, hooked passes, int4 grids) is in common.py.
Adding a method: one module here, one line below, one test.
"""

from farm.registry import Registry

METHODS = Registry("compression method", {
    "none": "farm.compress.none",
    "prune_layers": "farm.compress.prune_layers",
    "prune_mlp": "farm.compress.prune_mlp",
    "distill": "farm.compress.distill",
    "lora": "farm.compress.lora",
    "sft": "farm.compress.sft",
    "gqa": "farm.compress.gqa",
    "prune_heads": "farm.compress.prune_heads",
    "sparsify": "farm.compress.sparsify",
    "gptq": "farm.compress.gptq",
    "awq": "farm.compress.awq",
    "autoround": "farm.compress.autoround",
    "smoothquant": "farm.compress.smoothquant",
    "movement_pruning": "farm.compress.movement_pruning",
}, base="farm.plugin:StepOptions", key="method", needs=("apply",), plugin_kind="method")


def run_method(method: str, model_dir, step: dict, calib, out, threads: int, teacher_dir=None) -> dict:
    """Apply one step given as plain data (as a sweep file or a stage holds it): validated into the
    method's Options first, so defaults come from one place."""
    module = METHODS.get(method)
    opt = module.Options.model_validate({**step, "method": method})
    extra = {"teacher_dir": teacher_dir} if opt.TEACHER else {}
    return module.apply(model_dir, opt, calib, out, threads, **extra)
