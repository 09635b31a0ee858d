"""Stage ids come from the code itself: the import closure of the module that does a stage's work."""

import ast
import copy
from pathlib import Path

import pytest

from farm.plan import codeid, grid
from farm.stages import STAGES
from farm.sweep import spec

DEMO = spec.load(Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml").model_dump()


def build():
    return grid.build(spec.parse(copy.deepcopy(DEMO)))


def downstream(g, changed: set[str]) -> set[str]:
    """Every stage that depends, directly or not, on one of `changed` (itself included)."""
    out = set(changed)
    for sid, s in g.stages.items():  # topological order
        if any(d in out for d in s.deps):
            out.add(sid)
    return out


def edited(monkeypatch, rel: str):
    real = codeid._file_hash
    monkeypatch.setattr(codeid, "_file_hash", lambda f: "edited" if f == rel else real(f))


@pytest.mark.parametrize("helper,kinds", [
    ("compress/common.py", {"compress"}),  # every method loads through it
    ("runtimes/ggml_cpu.py", {"evaluate", "bench", "tasks", "serve"}),  # the GGUF cells' measurements only
    ("export/onnx_export.py", {"export"}),  # the ONNX exports only
])
def test_editing_a_helper_rebuilds_the_stages_that_import_it_and_nothing_else(monkeypatch, helper, kinds):
    a = build()
    edited(monkeypatch, helper)
    b = build()
    new = {sid for sid in b.stages if sid not in a.stages}
    direct = {sid for sid, s in b.stages.items() if s.kind in kinds and
              helper in codeid.code_version(_entries(s))["files"]}
    assert direct, f"no {kinds} stage imports {helper}"
    assert new == downstream(b, direct)  # those, what depends on them, and nothing else
    assert any(s.kind == "base" for sid, s in b.stages.items() if sid in a.stages)


def _entries(stage) -> list[str]:
    """The files whose closures make the stage's code id: its kind's module and what the kind names."""
    module = STAGES.get(stage.kind)
    return [grid._file(m) for m in [module.__name__, *module.code(stage.params)]]


def test_closure_follows_imports_inside_functions_but_not_into_registries():
    files, external = codeid.closure("compress/awq.py")
    assert {"compress/awq.py", "compress/common.py", "inputs/models.py", "plugin.py"} <= set(files)
    assert "compress/gptq.py" not in files  # awq no longer borrows from another method
    assert not any(f.endswith("__init__.py") for f in files)
    assert "torch" in external
    files, _ = codeid.closure("runtimes/llamacpp_rt.py")
    assert "runtimes/ggml_cpu.py" in files  # imported inside a method: it decides which CPU code runs


def test_library_versions_include_what_transformers_uses_and_python_where_the_corpus_is_read():
    ref = codeid.code_version(["measure/quality.py"])
    assert {"transformers", "tokenizers", "numpy"} <= set(ref["libraries"]) and "python" in ref
    gguf = codeid.code_version(["runtimes/llamacpp_rt.py"])
    assert "llama-cpp-python" in gguf["libraries"] and "python" not in gguf and "torch" not in gguf["libraries"]


def test_package_init_files_are_registries_only():
    """codeid leaves __init__.py out of every closure; that is only sound while they compute nothing."""
    for init in Path(codeid.PACKAGE).rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("farm"):
                assert node.module in ("farm.registry",), f"{init}: imports {node.module}"
            if isinstance(node, ast.FunctionDef):
                assert len(node.body) <= 6, f"{init}: {node.name} is more than a registry lookup"
