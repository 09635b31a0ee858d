"""What code decides a stage: the import closure of the module that runs it, read from the source (AST).

A stage's id holds a hash of every farm/ file that module imports, directly or through other farm modules
(imports inside functions count: heavy imports are lazy here), the versions of the third-party libraries
those files import, and the Python version where the embedded corpus (Python's own pydoc topics) is read.
Edit a helper and exactly the stages whose code imports it get new ids; nothing else is rebuilt.

Package `__init__.py` files are left out: they hold registries (a name -> a module) and nothing that
computes, which tests/test_codeid.py checks, so adding a plug-in does not rebuild every other one.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

PACKAGE = Path(__file__).parent.parent  # farm/
# libraries used through another one without being imported by name
IMPLIED = {"transformers": ("tokenizers", "safetensors", "huggingface-hub")}
CORPUS_MODULE = "inputs/data.py"  # reads pydoc_data.topics, which changes with the Python version


def module_file(name: str) -> str | None:
    """'farm.compress.gptq' -> 'compress/gptq.py' (relative to farm/); None if not a farm module."""
    if name != "farm" and not name.startswith("farm."):
        return None
    parts = name.split(".")[1:]
    for rel in ("/".join(parts) + ".py", "/".join([*parts, "__init__.py"])):
        if rel and (PACKAGE / rel).is_file():
            return rel
    return None


def _imports(rel: str) -> tuple[set[str], set[str]]:
    """(farm files, top-level third-party names) a farm file imports anywhere in its body."""
    tree = ast.parse((PACKAGE / rel).read_text(encoding="utf-8"), rel)
    here = ["farm", *Path(rel).with_suffix("").parts]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package
                pkg = here[: len(here) - node.level]
                base = ".".join([*pkg, base] if base else pkg)
            names += [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import submodule`
    files, external = set(), set()
    for name in names:
        f = module_file(name)
        if f is not None:
            files.add(f)
        elif name and not name.startswith("farm") and name.split(".")[0] not in sys.stdlib_module_names:
            external.add(name.split(".")[0])
    return {f for f in files if not f.endswith("__init__.py")}, external


@functools.cache
def closure(rel: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every farm file `rel` reaches through imports (itself included), and the third-party names they import."""
    seen, external, todo = set(), set(), [rel]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        files, ext = _imports(f)
        external |= ext
        todo += files - seen
    return tuple(sorted(seen)), tuple(sorted(external))


@functools.cache
def _file_hash(rel: str) -> str:
    return hashlib.sha256((PACKAGE / rel).read_bytes()).hexdigest()[:16]


@functools.cache
def distribution_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return packages_distributions()


def libraries(import_names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the distributions that provide these top-level import names."""
    dists = {d for n in import_names for d in _distributions().get(n, [])}
    dists |= {d for n in import_names for d in IMPLIED.get(n, ())}
    return {re.sub(r"[-_.]+", "-", d).lower(): distribution_version(d) for d in sorted(dists)}


def code_version(entries: list[str]) -> dict:
    """The code that decides a stage whose work is done by these farm files (e.g. ['compress/gptq.py'])."""
    files, external = set(), set()
    for entry in entries:
        f, e = closure(entry)
        files |= set(f)
        external |= set(e)
    out = {"files": {f: _file_hash(f) for f in sorted(files)}, "libraries": libraries(tuple(sorted(external)))}
    if CORPUS_MODULE in files:
        out["python"] = ".".join(map(str, sys.version_info[:3]))
    return out
