"""The packages' layers and their import graph, computed with ``ast`` from every import statement
(those inside functions included): each top-level folder is one package and may import only from
packages of lower layers, so the graph has no cycle (``tests/engine/test_layers.py`` checks it).

    python scripts/layers.py     # each package: layer, files, lines, what it imports
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first: (layer, responsibility). A package may import only from packages of lower layers.
LAYERS = {
    "common": (0, "errors, checked flag types, declared options, files and checkpoints, processes, meters"),
    "models": (1, "the backbones and their recipe facts, teacher loading and the frozen-teacher fast path"),
    "dataset": (1, "the data sets (each registers itself), loaders, views, the contrastive sampler, data needs"),
    "distiller_zoo": (2, "the Distiller contract and registry, the distillation step, the classic methods"),
    "crd": (3, "the contrastive family: memory banks, NCE critic, CRD, WCoRD, CRCD, DCD"),
    "engine": (4, "running a training: run builder, Fit and its parts, resume, results, flags and config files"),
    "helper": (5, "RepDistiller's import paths (helper.util, helper.loops, helper.pretrain): re-exports only"),
}


def package_of(module: str) -> str | None:
    """The project's top-level package holding ``module`` (None for another library's)."""
    top = module.split(".")[0]
    return top if top in LAYERS else None


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])
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


def package_files(package: str) -> list[Path]:
    """Every Python file of ``package``, its sub-folders included."""
    return sorted((ROOT / package).rglob("*.py"))


def package_graph() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the files of the package that import it."""
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for source in LAYERS:
        for path in package_files(source):
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


def upward_imports(graph: dict[str, dict[str, set[str]]]) -> list[str]:
    """Each import of a package from its own layer or a higher one, as a line naming the files."""
    return [f"{src} (layer {LAYERS[src][0]}) imports {dst} (layer {LAYERS[dst][0]}) in {sorted(files)}"
            for src, targets in graph.items() for dst, files in targets.items() if LAYERS[dst][0] >= LAYERS[src][0]]


def main() -> int:
    graph = package_graph()
    print(f"{'layer':<6}{'package':<15}{'files':>6}{'lines':>7}  imports")
    for name, (layer, what) in sorted(LAYERS.items(), key=lambda item: item[1][0]):
        files = package_files(name)
        lines = sum(len(p.read_text().splitlines()) for p in files)
        imports = ", ".join(sorted(graph.get(name, {}), key=lambda p: LAYERS[p][0])) or "-"
        print(f"{layer:<6}{name:<15}{len(files):>6}{lines:>7}  {imports}")
        print(f"{'':<21}{what}")
    problems = upward_imports(graph)
    cycle = find_cycle(graph)
    print("cycle: " + (" -> ".join(cycle) if cycle else "none") + f"; upward imports: {len(problems)}")
    for line in problems:
        print("  " + line)
    return 1 if problems or cycle else 0


if __name__ == "__main__":
    sys.exit(main())
