"""List import cycles among hubquant's modules (top-level and function-level imports alike).

    python scripts/import_cycles.py [PACKAGE_DIR ...]     # default: hubquant kernels/hubquant_kernels

A cycle is a set of modules that import each other directly or through one another. A package's
``__init__`` importing its submodules counts like any other import; importing a package because a submodule
is loaded does not (Python does that implicitly). Exit status 1 when there is a cycle.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path, base: Path) -> str:
    rel = path.relative_to(base).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of `known` that `path` (module `name`) imports anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def graph_of(dirs: list[Path]) -> dict[str, set[str]]:
    files = {}
    for d in dirs:
        for p in d.rglob("*.py"):
            files[module_name(p, d.parent)] = p
    known = set(files)
    graph = {}
    for name, path in files.items():
        deps = imports_of(path, name, known)
        # a submodule's implicit import of its own packages is not a cycle
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def main(argv: list[str]) -> int:
    dirs = [Path(a).resolve() for a in argv] or [ROOT / "hubquant", ROOT / "kernels" / "hubquant_kernels"]
    found = cycles(graph_of(dirs))
    for comp in found:
        print("cycle: " + " <-> ".join(comp))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
