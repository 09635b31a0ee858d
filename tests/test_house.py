"""The house's shape, read from the code's own imports: small modules, no import circle (between modules or between
folders), Ray and MLflow each behind their own folder, and plug-ins whose names stand only in their own module.

These are the promises docs/layout.md makes; each check names the file and line that breaks one.
"""

import ast
from pathlib import Path

import pytest

FARM = Path(__file__).resolve().parents[1] / "farm"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for f in FARM.rglob("*.py"):
        parts = f.relative_to(FARM.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path) -> set[str]:
    """The farm modules `name` imports anywhere in its body (imports inside functions count)."""
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != name:
                found.add(n)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def folder(module: str) -> str:
    """farm.run.driver -> farm.run; a module at farm/'s top level is a room of its own."""
    return ".".join(module.split(".")[:2])


def test_no_module_is_over_400_lines():
    big = {str(f.relative_to(FARM.parent)): n for f in FARM.rglob("*.py")
           if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by job): {big}"


def test_no_import_circle_between_modules_or_folders():
    graph = {m: imports(m, f) for m, f in modules().items()}
    assert circles(graph) == [], "modules that import each other in a loop"
    folders: dict[str, set[str]] = {}
    for m, out in graph.items():
        folders.setdefault(folder(m), set()).update(folder(o) for o in out if folder(o) != folder(m))
    assert circles(folders) == [], "folders that import each other (an import that runs back up the data flow)"


@pytest.mark.parametrize("library,allowed", [
    ("ray", ("farm.run.",)),
    ("mlflow", ("farm.record.", "farm.decide.promote", "farm.decide.deploy")),
])
def test_ray_and_mlflow_each_live_behind_their_own_folder(library, allowed):
    where = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            got = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(g == library or g.startswith(library + ".") for g in got) and not name.startswith(allowed):
                where.append(f"{path.relative_to(FARM.parent)}:{node.lineno}")
    assert not where, f"{library} imported outside {allowed}: {where}"


# Literals that equal a plug-in's name but are not that plug-in: (file, name) -> why.
NOT_THE_PLUGIN = {
    ("export/onnx_export.py", "gptq"): "an int4 algorithm of ONNX Runtime's quantizer, not the gptq method",
    ("export/openvino_export.py", "gptq"): "an int4 algorithm of NNCF, not the gptq method",
    ("export/openvino_export.py", "awq"): "an int4 algorithm of NNCF, not the awq method",
    ("stages/runner.py", "torch"): "a library whose version every stage records",
    ("inputs/models.py", "gguf"): "the embedded model ships as a GGUF file",
    ("decide/deploy.py", "lora"): "a field of the request body (llama-server's per-request adapters)",
    ("cli.py", "serve"): "the `farm serve` command",
    ("decide/deploy.py", "serve"): "the `mlflow models serve` command",
    ("decide/report.py", "roofline"): "a column's heading",
    ("measure/roofline.py", "roofline"): "the folder of the bandwidth cache",
}
# A plug-in's own package may name its default partner: a format its default runtime, a runtime the format it
# reads. Listed: (file, name) pairs where one plug-in names another on purpose.
PARTNERS = {
    ("export/gguf_export.py", "llamacpp"), ("export/onnx_export.py", "onnxruntime"),
    ("runtimes/llamacpp_rt.py", "gguf"), ("runtimes/onnx_rt.py", "onnx"),
    ("stages/roofline.py", "bench"),  # a measurement reads the cell's benchmark (INPUTS)
}
NOT_YET: set[tuple[str, str]] = set()  # known strays not yet moved: none


def plugin_names() -> dict[str, set[str]]:
    """name -> the modules that implement a plug-in of that name (methods, formats, runtimes, engines, stage
    kinds), from the registries themselves."""
    from farm.compress import METHODS
    from farm.export import FORMATS
    from farm.runtimes import RUNTIMES
    from farm.serve import ENGINES
    from farm.stages import STAGES

    out: dict[str, set[str]] = {}
    for registry in (METHODS, FORMATS, RUNTIMES, ENGINES):
        for name in registry.names():
            out.setdefault(name, set()).add(registry.module_name(name))
    out.pop("none", None)  # the empty method is also the word for 'no pipeline'
    from farm.stages.common import measurements

    for name in measurements():  # a measurement kind's name; the production chain is the grid's own structure
        out.setdefault(name, set()).add(STAGES.module_name(name))
    return out


def strays(sources: dict[str, tuple[str, str]], names: dict[str, set[str]]) -> list[str]:
    """'farm/<file>:<line>: <name>' for every string literal that equals a plug-in's name outside that plug-in's
    module and the lists above. sources: module -> (file relative to farm/, its text)."""
    found = []
    for module, (rel, text) in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                name = node.value
                if module in names[name] or (rel, name) in set(NOT_THE_PLUGIN) | PARTNERS | NOT_YET:
                    continue
                found.append(f"farm/{rel}:{node.lineno}: '{name}'")
    return found


def sources() -> dict[str, tuple[str, str]]:
    return {m: (str(p.relative_to(FARM)), p.read_text()) for m, p in modules().items() if p.name != "__init__.py"}


def test_a_plugin_name_stands_only_in_its_own_module():
    found = strays(sources(), plugin_names())
    assert not found, "plug-in names outside their own module (declare what the caller needs on the plug-in " \
                      f"instead): {found}"


def test_the_guard_catches_a_driver_that_names_a_plugin():
    """The check above can fail: the driver with one line that dispatches on a kind and a format is caught."""
    mine = sources()
    rel, text = mine["farm.run.driver"]
    mine["farm.run.driver"] = (rel, text + "\nif stage.kind == 'bench' and fmt == 'gguf':\n    pass\n")
    found = strays(mine, plugin_names())
    assert len(found) == 2 and all(f.startswith("farm/run/driver.py:") for f in found), found
