"""The package's shape (docs/architecture.md): one-way imports, no hidden cycles, small files and functions.

``lint-imports`` (run by ``make test``) checks the layer contract in pyproject.toml; these tests check what it does
not: cycles inside one layer, imports tucked into functions, sizes, and what ``import criticality`` loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "criticality"
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
OPTIONAL = ("transformers", "timm", "PIL", "pyarrow", "huggingface_hub", "accelerate", "torchvision")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    """The package module an imported dotted name lives in (None for names outside the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[ast.AST, str]]:
    """Every package module ``module`` imports, anywhere in the file, with the import statement."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found += [(node, t) for t in map(_target, names) if t and t != module]
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {t for _, t in _imports(m, p)} for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_counting_imports_inside_functions():
    assert _cycles(_graph()) == []


def test_no_package_import_inside_a_function():
    tucked = []
    for path in MODULES.values():
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import | ast.ImportFrom) and any(
                            _target(n) for n in ([a.name for a in node.names] if isinstance(node, ast.Import)
                                                 else [node.module or ""])) or getattr(node, "level", 0):
                        tucked.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert tucked == []


def test_internal_modules_do_not_import_the_package_root():
    offenders = [m for m, p in MODULES.items()
                 if m != "criticality" and "criticality" in {t for _, t in _imports(m, p)}]
    assert offenders == []


def test_files_and_functions_are_small():
    long_files = [f"{p.relative_to(SRC)}: {n}" for p in MODULES.values()
                  if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    long_functions = [f"{p.relative_to(SRC)}:{fn.lineno} {fn.name}: {fn.end_lineno - fn.lineno + 1}"
                      for p in MODULES.values() for fn in ast.walk(ast.parse(p.read_text()))
                      if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                      and fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert long_files == [] and long_functions == []


def test_importing_the_package_loads_no_optional_dependency():
    # pandas may load pyarrow itself: count only what loads beyond a bare `import pandas`.
    code = ("import sys; import pandas; before = set(sys.modules); import criticality; "
            f"print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in {OPTIONAL!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


def test_the_moved_proxies_module_warns_and_still_works():
    sys.modules.pop("criticality.proxies", None)
    with pytest.warns(FutureWarning, match="criticality.interventions.proxies"):
        import criticality.proxies as shim
    from criticality.interventions import proxies
    assert shim.block_proxies is proxies.block_proxies


def test_the_documented_public_api_is_importable():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        import criticality
        from criticality import groups, surgery, trajectory
    assert callable(criticality.analyze) and criticality.Result and callable(criticality.module_criticality)
    assert callable(groups.resolve) and callable(trajectory.trajectory) and callable(surgery.reinit)
