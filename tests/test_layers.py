"""The packages form layers: a package imports only from layers below it (computed with ``ast``
from every import statement, those inside functions included), so the import graph has no cycle;
and no method, data or model code reads the scripts' ``opt``."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A package may import only from packages of lower layers.
LAYERS = {
    "helper": 0,          # errors, checked flag types, declared options, processes, checkpoints, the loop (Fit)
    "models": 1,          # networks, teacher loading
    "dataset": 1,         # data sets, loaders, the contrastive sampler, data needs and options
    "distiller_zoo": 2,   # the Distiller contract and registry, the distillation step, the classic methods
    "crd": 3,             # the contrastive family (memory banks, CRD, WCoRD, CRCD, DCD)
    "helper.cli": 4,      # the scripts' flags and config files, the list of every method
}
TOP_LEVEL = sorted({name.split(".")[0] for name in LAYERS})
# RepDistiller's own signatures that take its ``opt`` (kept so that its code runs unchanged).
READS_OPT = {"crd/criterion.py"}


def package_of(module: str) -> str | None:
    """The deepest package (a folder with __init__.py) of the project holding ``module``."""
    parts = module.split(".")
    if parts[0] not in TOP_LEVEL:
        return None
    for end in range(len(parts), 0, -1):
        if (ROOT.joinpath(*parts[:end]) / "__init__.py").is_file():
            return ".".join(parts[:end])
    return parts[0]


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts if path.name == "__init__.py" else rel.parts[:-1])
    if path.name == "__init__.py":
        package = package[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            names.append(".".join(base + ([node.module] if node.module else [])))
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module)
    return names


def package_graph() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the files of the package that import it."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for top in TOP_LEVEL:
        for path in sorted((ROOT / top).rglob("*.py")):
            source = package_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
            for module in imported_modules(path):
                target = package_of(module)
                if target is not None and target != source:
                    graph[source][target].add(str(path.relative_to(ROOT)))
    return graph


def find_cycle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    """A cycle of the graph as a list of packages (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in list(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_import_graph_has_no_cycle():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_every_import_goes_to_a_lower_layer():
    graph = package_graph()
    unknown = sorted(set(graph) - set(LAYERS))
    assert not unknown, f"packages without a layer in LAYERS: {unknown}"
    upward = [f"{src} (layer {LAYERS[src]}) imports {dst} (layer {LAYERS[dst]}) in {sorted(files)}"
              for src, targets in graph.items() for dst, files in targets.items() if LAYERS[dst] >= LAYERS[src]]
    assert not upward, "\n".join(upward)


def test_the_checker_finds_a_cycle_and_resolves_relative_imports(tmp_path):
    graph = {"a": {"b": {"a/x.py"}}, "b": {"c": {"b/y.py"}}, "c": {"a": {"c/z.py"}}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": set()}, "b": {}}) is None
    assert "helper.errors" in imported_modules(ROOT / "helper" / "checkpoint.py")
    assert "distiller_zoo.registry" in imported_modules(ROOT / "distiller_zoo" / "KD.py")  # from .registry import ...
    assert package_of("helper.cli.options") == "helper.cli" and package_of("helper.errors") == "helper"
    assert package_of("torch.nn") is None


@pytest.mark.parametrize("package", ["distiller_zoo", "crd", "dataset", "models"])
def test_method_data_and_model_code_never_reads_opt(package):
    """No ``getattr(opt, ...)`` and no function taking ``opt``: options arrive as typed objects."""
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        text = path.read_text()
        if "getattr(opt" in text:
            offenders.append(f"{rel}: getattr(opt")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and rel not in READS_OPT:
                if any(arg.arg == "opt" for arg in node.args.args + node.args.kwonlyargs):
                    offenders.append(f"{rel}:{node.lineno} {node.name}(opt)")
    assert not offenders, offenders
