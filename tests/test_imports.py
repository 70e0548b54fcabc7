"""The package has no import cycles, counting imports inside functions (which only hide one)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megareuse"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules imported anywhere in the file (``from X import name`` counts X, or X.name
    when that is a module)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules and n != me)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]):
    """One cycle as a list of modules, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop(), path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_cycle_finder_finds_a_hidden_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_package_has_no_import_cycles():
    graph = import_graph()
    assert "megareuse.cli" in graph and graph["megareuse.cli"]  # the parse found imports
    # package __init__ modules re-export their submodules: a submodule importing its own package
    # is not a cycle of the code, so edges from a submodule to an enclosing package are dropped
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_subpackages_have_no_import_cycles():
    """Between the package's parts (engine, reuse, sweep, law, exits, ...) imports go one way:
    engine <-> reuse (through the run records and the init source) and exits <-> sweep (through
    SweepError) were such cycles; each part reaches the shared pieces (megareuse.records,
    megareuse.errors, engine.init_source) instead."""
    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for module, deps in import_graph().items():
        graph.setdefault(part(module), set()).update(
            part(d) for d in deps if part(d) != part(module) and not module.startswith(d + "."))
    assert "megareuse.engine" in graph["megareuse.reuse"]  # the parse sees the parts' imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between parts: " + " -> ".join(cycle)


# ---------------------------------------------------------------- shadowing installed modules
REPO = PACKAGE.parent
# folders that land on sys.path: the checkout (python -m ..., python -c in it), benchmarks/ (its
# scripts), tests/ (pytest's rootdir conftest) and megareuse/ (python megareuse/train.py)
ON_SYS_PATH = (REPO, REPO / "benchmarks", REPO / "tests", REPO / "megareuse")


def _installed_top_level() -> set[str]:
    import importlib.metadata as md
    import sys
    names = set(sys.stdlib_module_names)
    for dist in md.distributions():
        top = dist.read_text("top_level.txt")
        if top:
            names.update(top.split())
        else:
            names.update(f.parts[0].removesuffix(".py") for f in dist.files or ()
                         if f.parts and not f.parts[0].endswith((".dist-info", ".data")) and f.parts[0] != "..")
    return names


def test_checkout_shadows_no_installed_module():
    """A module or package in a folder that lands on sys.path named like the standard library's
    or an installed project's (transformers >= 5.25 imports the PyPI project `kernels`; a
    kernels/__init__.py at the top of the checkout broke `python -m pytest` there) is an error."""
    taken = _installed_top_level() - {"megareuse"}
    clashes = []
    for folder in ON_SYS_PATH:
        for p in folder.iterdir():
            name = p.stem if p.suffix == ".py" else p.name if (p / "__init__.py").is_file() else None
            if name in taken:
                clashes.append(str(p.relative_to(REPO)))
    assert not clashes, f"these shadow an installed module of the same name: {clashes}"


def test_transformers_imports_from_the_checkout():
    """The checkout first on sys.path (as under `python -m pytest`) leaves transformers' Llama importable."""
    import subprocess
    import sys
    import pytest
    pytest.importorskip("transformers")
    code = "import sys; sys.path.insert(0, ''); from transformers import LlamaConfig, LlamaForCausalLM"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
