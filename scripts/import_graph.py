"""The import graph of src/distillm: module-level import cycles, imports inside functions, private names used
across modules.

    python scripts/import_graph.py [--verbose] [--src DIR]    (DIR: the folder holding distillm/, default src/)

Module-level imports (the ones that run when a module is imported) make the graph whose cycles are counted;
imports inside functions are listed separately (they close cycles lazily when they point back up the graph).
A cycle here is a strongly connected component of more than one module (over module-level edges, and again over
all edges). Private names: `from distillm.x import _name` in another module.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "distillm"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(modules: dict[str, Path]):
    """Yield (importer, imported module, names, inside_function, line)."""
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        func_nodes = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        func_nodes.add(id(inner))
        type_checking = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for inner in ast.walk(node):
                    type_checking.add(id(inner))
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield name, alias.name, [], id(node) in func_nodes, node.lineno
            elif isinstance(node, ast.ImportFrom):
                target = resolve(name, is_package, node)
                names = [a.name for a in node.names]
                # `from pkg import submodule` imports the submodule
                subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                rest = [n for n in names if f"{target}.{n}" not in modules]
                if rest or not subs:  # `from . import submodule` alone depends on the submodule, not on the package
                    yield name, target, rest, id(node) in func_nodes, node.lineno
                for sub in subs:
                    yield name, sub, [], id(node) in func_nodes, node.lineno


def sccs(nodes, edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--src", default=None, help="the folder holding the distillm package (default: src/)")
    args = parser.parse_args()
    global ROOT
    if args.src:
        ROOT = Path(args.src).resolve()
    modules = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}
    top_edges: dict[str, set[str]] = {}
    all_edges: dict[str, set[str]] = {}
    in_function = []
    private = []
    for importer, target, names, lazy, line in scan(modules):
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            # importing a.b.c runs a/__init__ and a.b/__init__ too; the edge to the module itself is what matters
            if target in modules:
                all_edges.setdefault(importer, set()).add(target)
                if not lazy:
                    top_edges.setdefault(importer, set()).add(target)
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != importer:
                    private.append(f"{importer}:{line} uses {target}.{n}")
        if lazy:
            in_function.append(f"{importer}:{line} imports {target}")
    top = sccs(modules, top_edges)
    every = sccs(modules, all_edges)
    own = [x for x in in_function if f" imports {PACKAGE}" in x]
    print(f"modules: {len(modules)}")
    print(f"module-level import cycles (strongly connected groups): {len(top)}"
          + "".join(f"\n  {' <-> '.join(c)}" for c in top))
    print(f"cycles counting imports inside functions too: {len(every)} groups, "
          f"{sum(len(c) for c in every)} modules" + "".join(f"\n  {' <-> '.join(c)}" for c in every))
    print(f"imports inside functions: {len(in_function)} ({len(own)} of distillm modules, "
          f"{len(in_function) - len(own)} of other packages)")
    print(f"private names imported across modules: {len(private)}")
    if args.verbose:
        for line in in_function:
            print("  in function:", line)
        for line in private:
            print("  private:", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
