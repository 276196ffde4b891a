"""The packages form layers: a package imports only from layers below it (computed with ``ast``
from every import statement, those inside functions included), so the import graph has no cycle;
and no method, data or model code reads the scripts' ``opt``."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Lowest first; a top-level folder is one package (its sub-packages count as itself). A package
# may import only from packages of lower layers.
LAYERS = {
    "common": 0,          # errors, checked flag types, declared options, files and checkpoints, processes, meters
    "models": 1,          # networks (and their recipe facts), teacher loading
    "dataset": 1,         # data sets (each registers itself), loaders, the contrastive sampler, data needs
    "distiller_zoo": 2,   # the Distiller contract and registry, the distillation step, the classic methods
    "crd": 3,             # the contrastive family (memory banks, CRD, WCoRD, CRCD, DCD)
    "engine": 4,          # running a training: the run builder, Fit and its parts, resume, results, flags
    "helper": 5,          # RepDistiller's import paths (helper.util, helper.loops, helper.pretrain): re-exports
}
TOP_LEVEL = sorted(LAYERS)
# RepDistiller's own signatures that take its ``opt`` (kept so that its code runs unchanged).
READS_OPT = {"crd/criterion.py"}
SCRIPTS = sorted([*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py")])


def package_of(module: str) -> str | None:
    """The project's top-level package holding ``module`` (None for another library's)."""
    top = module.split(".")[0]
    return top if top in LAYERS else None


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
        for path in sorted((ROOT / top).rglob("*.py")):  # sub-packages included: they are their folder
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
    assert "common.errors" in imported_modules(ROOT / "common" / "checkpoint.py")
    assert "distiller_zoo.registry" in imported_modules(ROOT / "distiller_zoo" / "KD.py")  # from .registry import ...
    assert package_of("engine.options") == "engine" and package_of("crd.memory") == "crd"
    assert package_of("torch.nn") is None


def test_nothing_of_ours_imports_repdistillers_paths():
    """``helper`` holds RepDistiller's import paths for code written for it; the library's own
    packages and scripts import the modules those re-export instead."""
    ours = [p for top in TOP_LEVEL if top != "helper" for p in sorted((ROOT / top).rglob("*.py"))] + SCRIPTS
    offenders = [str(p.relative_to(ROOT)) for p in ours if any(package_of(m) == "helper" for m in imported_modules(p))]
    assert not offenders, offenders


def test_repdistillers_import_paths_are_one_line_re_exports():
    for name in ("util", "loops", "pretrain"):
        tree = ast.parse((ROOT / "helper" / f"{name}.py").read_text())
        code = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert all(isinstance(n, (ast.ImportFrom, ast.Assign)) for n in code), name  # imports and __all__ only


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
