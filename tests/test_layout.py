"""Cross-cutting layout rules (DESIGN.md "Layers", issue 10), read from the source with ``ast``:
no import cycle in stages/ or flows/ (imports inside functions count), the layering rules, and
short functions. Nothing here imports the code it checks."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "flows")
RECIPES = {f"stages.{k}" for k in ("world", "cnn", "detector", "bert", "vl", "caption", "vqa", "targets")}
MAX_LINES = 80

# Functions allowed to stay longer than MAX_LINES, as "path:qualified.name", each with a comment saying
# why it must. Empty: flows/cli.py's argparse main is 53 lines, and every other long one is to be split.
LONG_ALLOWED: set[str] = set()


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module or name, dotted and absolute
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    """{dotted module name: file} of every module under the checked packages."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path) -> list[Import]:
    """Every import statement of a module, at any depth (functions, ``if TYPE_CHECKING``, try blocks)."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [Import(name, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out += [Import(name, f"{mod}.{a.name}", node.lineno) for a in node.names]
    return out


def resolve(target: str, modules: set[str]) -> str | None:
    """The project module an import target lands in (``stages.train.loop.fit`` -> ``stages.train.loop``)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def all_imports() -> list[Import]:
    return [imp for name, path in source_files().items() for imp in imports_of(name, path)]


def import_graph() -> nx.DiGraph:
    modules = set(source_files())
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for imp in all_imports():
        target = resolve(imp.target, modules)
        if target is not None and target != imp.source:
            g.add_edge(imp.source, target, line=imp.line)
    return g


def cycles(g: nx.DiGraph) -> list[str]:
    """One cycle per strongly connected component, as ``a:12 -> b:40 -> a`` (line of each import)."""
    out = []
    for scc in nx.strongly_connected_components(g):
        if len(scc) < 2:
            continue
        edges = nx.find_cycle(g.subgraph(scc))
        out.append(" -> ".join(f"{a}:{g.edges[a, b]['line']}" for a, b in edges) + f" -> {edges[0][0]}"
                   + (f"  (component: {', '.join(sorted(scc))})" if len(scc) > len(edges) else ""))
    return sorted(out)


def test_import_graph_sees_imports_inside_functions():
    g = import_graph()
    assert g.number_of_edges() > 50, "the import walk found almost nothing: is ROOT right?"
    # flows/cli.py imports the flow inside its command functions, not at the top
    assert any(t.startswith("flows.") for t in g.successors("flows.cli"))


def test_no_import_cycle_in_stages_or_flows():
    found = cycles(import_graph())
    assert not found, "import cycles (module:line of the import):\n  " + "\n  ".join(found)


def _offenders(rule) -> list[str]:
    modules = set(source_files())
    return sorted({f"{imp.source}:{imp.line} imports {resolve(imp.target, modules) or imp.target}"
                   for imp in all_imports() if rule(imp)})


def _top(imp: Import) -> str:
    return imp.target.split(".")[0]


def test_stages_never_import_prefect_ray_mlflow_or_flows():
    bad = _offenders(lambda i: i.source.startswith("stages") and _top(i) in {"prefect", "prefect_ray", "ray",
                                                                              "mlflow", "flows"})
    assert not bad, "stages/ is plain PyTorch (DESIGN.md Layers):\n  " + "\n  ".join(bad)


def test_the_shipped_packages_never_import_tools():
    bad = _offenders(lambda i: _top(i) == "tools")
    assert not bad, "tools/ is not in the wheel (DESIGN.md Layers):\n  " + "\n  ".join(bad)


def test_a_stage_recipe_never_imports_another_stage_recipe():
    modules = set(source_files())
    bad = _offenders(lambda i: i.source in RECIPES and resolve(i.target, modules) in RECIPES - {i.source})
    assert not bad, "a stage's code digest follows its imports (DESIGN.md):\n  " + "\n  ".join(bad)


def test_models_data_train_never_import_a_stage_recipe():
    modules = set(source_files())
    libs = ("stages.models", "stages.data", "stages.train", "stages.config")
    bad = _offenders(lambda i: i.source.startswith(libs) and resolve(i.target, modules) in RECIPES)
    assert not bad, "models/, data/, train/, config/ are libraries under the recipes:\n  " + "\n  ".join(bad)


def _function_lengths(path: Path) -> dict[str, int]:
    """{qualified name: lines from ``def`` to the last line} of every function and method, nested ones too."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out[name] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text()), "")
    return out


def long_functions() -> dict[str, int]:
    return {f"{p.relative_to(ROOT)}:{fn}": n for p in source_files().values()
            for fn, n in _function_lengths(p).items() if n > MAX_LINES}


def test_no_function_longer_than_80_lines():
    long = long_functions()
    bad = {k: n for k, n in long.items() if k not in LONG_ALLOWED}
    assert not bad, f"functions over {MAX_LINES} lines (split them, or allow-list with a reason):\n  " + "\n  ".join(
        f"{k}: {n} lines" for k, n in sorted(bad.items(), key=lambda kv: -kv[1]))


def test_the_allow_list_names_only_long_functions_that_exist():
    stale = LONG_ALLOWED - set(long_functions())
    assert not stale, f"allow-listed but now short or gone (remove from LONG_ALLOWED): {sorted(stale)}"


@pytest.mark.parametrize("src, expected", [
    ("import a\n\ndef f():\n    from b import c\n", ["a", "b.c"]),
    ("from . import x\n", ["stages.train.x"]),
    ("from ..contract import y\n", ["stages.contract.y"]),
])
def test_imports_of_walks_function_bodies_and_resolves_relative_imports(tmp_path, src, expected):
    f = tmp_path / "loop.py"
    f.write_text(src)
    assert [i.target for i in imports_of("stages.train.loop", f)] == expected


def test_cycles_are_named_with_their_modules():
    g = nx.DiGraph()
    g.add_edge("stages.base", "stages.checkpoint", line=3)
    g.add_edge("stages.checkpoint", "stages.base", line=9)
    g.add_edge("stages.checkpoint", "stages.fsio", line=10)
    assert cycles(g) in (["stages.base:3 -> stages.checkpoint:9 -> stages.base"],
                         ["stages.checkpoint:9 -> stages.base:3 -> stages.checkpoint"])
