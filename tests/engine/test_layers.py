"""The packages form layers: a package imports only from layers below it (computed with ``ast``
from every import statement, those inside functions included), so the import graph has no cycle;
and no method, data or model code reads the scripts' ``opt``."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from scripts.layers import LAYERS, find_cycle, imported_modules, package_graph, package_of, upward_imports

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = sorted(LAYERS)
# RepDistiller's own signatures that take its ``opt`` (kept so that its code runs unchanged).
READS_OPT = {"crd/criterion.py"}
SCRIPTS = sorted([*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py")])


def test_the_package_import_graph_has_no_cycle():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_every_import_goes_to_a_lower_layer():
    upward = upward_imports(package_graph())
    assert not upward, "\n".join(upward)


def test_every_top_level_folder_with_python_code_has_a_layer():
    folders = {p.parent.relative_to(ROOT).parts[0] for p in ROOT.glob("*/**/*.py")}
    assert folders - {"tests", "scripts", "docs", "save", "data"} - {f for f in folders if f.startswith(".")} == set(LAYERS)


def test_the_checker_finds_a_cycle_and_resolves_relative_imports(tmp_path):
    graph = {"a": {"b": {"a/x.py"}}, "b": {"c": {"b/y.py"}}, "c": {"a": {"c/z.py"}}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": set()}, "b": {}}) is None
    assert "common.errors" in imported_modules(ROOT / "common" / "checkpoint.py")
    assert "distiller_zoo.registry" in imported_modules(ROOT / "distiller_zoo" / "KD.py")  # from .registry import ...
    assert package_of("engine.options") == "engine" and package_of("crd.memory") == "crd"
    assert package_of("torch.nn") is None
    upward = upward_imports({"engine": {"helper": {"engine/x.py"}}, "crd": {"models": {"crd/y.py"}}})
    assert upward == ["engine (layer 4) imports helper (layer 5) in ['engine/x.py']"]


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


# engine/ is in parts: no file over ENGINE_FILE_LINES lines, no function (methods and nested ones
# included) over ENGINE_FUNCTION_LINES.
ENGINE_FILE_LINES, ENGINE_FUNCTION_LINES = 300, 60


def engine_sizes() -> tuple[dict[str, int], dict[str, int]]:
    """Lines of each engine/*.py, and of each function there (``path:Class.name``), from its
    ``def`` to its last line."""
    files, functions = {}, {}
    for path in sorted((ROOT / "engine").glob("*.py")):
        rel, text = str(path.relative_to(ROOT)), path.read_text()
        files[rel] = len(text.splitlines())

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    functions[f"{rel}:{prefix}{child.name}"] = child.end_lineno - child.lineno + 1
                    visit(child, f"{prefix}{child.name}.")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")
                else:
                    visit(child, prefix)

        visit(ast.parse(text), "")
    return files, functions


def test_engine_files_and_functions_are_small():
    files, functions = engine_sizes()
    long_files = sorted(f"{name} ({n} lines)" for name, n in files.items() if n > ENGINE_FILE_LINES)
    long_functions = sorted(f"{name} ({n} lines)" for name, n in functions.items() if n > ENGINE_FUNCTION_LINES)
    assert not long_files, f"engine files over {ENGINE_FILE_LINES} lines: {long_files}"
    assert not long_functions, f"engine functions over {ENGINE_FUNCTION_LINES} lines: {long_functions}"
    assert "engine/fit.py:Fit.__call__" in functions and "engine/epoch.py:train_one_epoch" in functions  # it sees them


def test_the_layers_script_prints_every_package_and_no_cycle(capsys):
    from scripts import layers
    assert layers.main() == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("cycle: none; upward imports: 0")
    rows = [line.split() for line in out.splitlines()[1:] if line[:1].isdigit()]
    assert [row[1] for row in rows] == sorted(LAYERS, key=lambda name: (LAYERS[name][0], list(LAYERS).index(name)))
    assert all(int(row[3]) > 0 for row in rows)  # lines counted
