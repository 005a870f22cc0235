"""No import cycles among the methods, the formats and the kernels (scripts/import_cycles.py finds them)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "scripts" / "import_cycles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_cycles_in_methods_formats_and_kernels():
    ic = _checker()
    graph = ic.graph_of([ROOT / "hubquant", ROOT / "kernels" / "hubquant_kernels"])
    assert "hubquant.methods.smoothquant" in graph and "hubquant_kernels.w4a16" in graph
    mine = ("hubquant.methods", "hubquant.formats", "hubquant_kernels")
    found = [c for c in ic.cycles(graph) if any(m.startswith(mine) for m in c)]
    assert found == []


def test_the_checker_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert _checker().cycles(_checker().graph_of([pkg])) == [["pkg.a", "pkg.b"]]
