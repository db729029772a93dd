"""The import rules of DESIGN.md: the one-way chain of layers (import-linter's contracts in
pyproject.toml), no import circle anywhere in advlab (lazy imports inside functions included), and
tests that reach into the paper modules only through the reproduction entry points."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
TESTS = Path(__file__).resolve().parent

#: what a test may import from advlab.papers: the entry points that run a reproduction
PAPERS_ENTRY_POINTS = {"reproduce", "resolve_spec", "list_reproductions"}


def _graph():
    grimp = pytest.importorskip("grimp", reason="grimp (installed with import-linter, the 'test' extra) is needed "
                                                "to build advlab's import graph")
    sys.path.insert(0, str(SRC))  # the working tree's advlab, whatever is installed
    try:
        return grimp.build_graph("advlab", include_external_packages=False, cache_dir=None)
    finally:
        sys.path.remove(str(SRC))


def test_import_linter_contracts_are_kept():
    pytest.importorskip("importlinter", reason="import-linter (the 'test' extra) is not installed: pip install -e '.[test]'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"lint-imports failed:\n{done.stdout}\n{done.stderr}"
    assert "0 broken" in done.stdout, done.stdout


def test_the_layers_contract_names_every_top_level_module():
    """A new top-level module or package must be placed in the chain (import-linter's exhaustive
    option needs containers, so this is checked here)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11+) or tomli")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    named = {name.strip() for layer in layers for name in layer.replace("|", ":").split(":")}
    top = {f"advlab.{p.stem}" for p in (SRC / "advlab").glob("*.py") if p.stem != "__init__"}
    top |= {f"advlab.{p.parent.name}" for p in (SRC / "advlab").glob("*/__init__.py")}
    assert top - named == set(), f"top-level modules not in the layers contract (pyproject.toml): {sorted(top - named)}"
    assert named - top == set(), f"the layers contract names modules that do not exist: {sorted(named - top)}"


def _cycles(graph):
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def _describe(graph, component):
    """One circle through ``component``, as ``a -> b -> ... -> a`` with the importing lines."""
    start = component[0]
    path = graph.find_shortest_chain(importer=start, imported=component[1]) or [start, component[1]]
    back = graph.find_shortest_chain(importer=component[1], imported=start) or [component[1], start]
    chain = list(path) + list(back[1:])
    steps = []
    for a, b in zip(chain, chain[1:]):
        lines = graph.get_import_details(importer=a, imported=b)
        where = ", ".join(f"l.{d['line_number']}" for d in lines) if lines else "?"
        steps.append(f"{a} -> {b} ({where})")
    return f"{{{', '.join(component)}}}: " + "; ".join(steps)


def test_no_import_circles_in_advlab():
    graph = _graph()
    found = _cycles(graph)
    assert not found, "import circles in advlab (lazy imports count):\n" + "\n".join(_describe(graph, c) for c in found)


def test_the_package_itself_imports_no_advlab_module():
    """``advlab/__init__`` (``__version__``, ``REJECT``) is imported by every layer, so it sits
    below all of them: it imports nothing of advlab."""
    graph = _graph()
    assert graph.find_modules_directly_imported_by("advlab") == set()


def _papers_imports(path: Path):
    """``(line, what)`` of every way ``path`` imports advlab.papers or something from it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "advlab.papers" or a.name.startswith("advlab.papers."):
                    yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "advlab":
                for a in node.names:
                    if a.name == "papers":
                        yield node.lineno, "advlab.papers", None
            elif node.module == "advlab.papers" or node.module.startswith("advlab.papers."):
                for a in node.names:
                    yield node.lineno, node.module, a.name
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            arg = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(arg, str) and (
                    arg == "advlab.papers" or arg.startswith("advlab.papers.")):
                yield node.lineno, arg, None


def test_tests_use_the_papers_only_through_the_reproduction_entry_points():
    """No test imports a ``_private`` name of advlab.papers, nor anything of it but the entry
    points that run a reproduction; the library pieces the papers use live below them."""
    bad = []
    for path in sorted(TESTS.glob("*.py")):
        for line, module, name in _papers_imports(path):
            if name is not None and name.startswith("_"):
                bad.append(f"{path.name}:{line}: imports the private name {name} from {module}")
            elif module != "advlab.papers" or name not in PAPERS_ENTRY_POINTS:
                what = f"{name} from {module}" if name else module
                bad.append(f"{path.name}:{line}: imports {what}; tests may import only "
                           f"{', '.join(sorted(PAPERS_ENTRY_POINTS))} from advlab.papers")
    assert not bad, "\n".join(bad)
