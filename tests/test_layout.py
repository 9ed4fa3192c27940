"""The package's import graph is a short stack of layers: a module imports only from its own layer
or the ones below it, and nothing imports the package's __init__ (which re-exports from every
layer). Lazy imports inside functions count too: they are edges all the same."""

from __future__ import annotations

import ast
import pathlib
import types
from typing import Dict, Iterator, Set

import loramux

PACKAGE_DIR = pathlib.Path(loramux.__file__).parent

# lowest first; a module's layer is its first path component under loramux/ (or its first two,
# where those are listed)
LAYERS = [
    ("_core", "errors"),
    ("modules", "layout"),
    ("format",),
    ("dora",),
    ("convert",),
    ("cache",),
    ("ops",),
    ("models",),
    ("parallel",),
    ("serving",),
    ("demo",),
    ("serving.server",),  # the HTTP server serves the packaged demo model too
    ("cli",),
]
RANK: Dict[str, int] = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules() -> Iterator[pathlib.Path]:
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path != PACKAGE_DIR / "__init__.py":
            yield path


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["loramux", *parts])


def _imported(path: pathlib.Path) -> Set[str]:
    """Every loramux module `path` imports: `from loramux.x import y` names loramux.x.y when y is a
    submodule, else loramux.x; `from loramux import x` names loramux.x when x is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "loramux")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "loramux":
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                as_path = PACKAGE_DIR.joinpath(*candidate.split(".")[1:])
                is_module = as_path.with_suffix(".py").exists() or (as_path / "__init__.py").exists() \
                    or candidate == "loramux._core"
                found.add(candidate if is_module else base)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if ".".join(parts[1:3]) in RANK:
        return ".".join(parts[1:3])
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_belongs_to_a_layer():
    unplaced = sorted({_layer(_module_name(p)) for p in _modules()} - set(RANK))
    assert not unplaced, f"give these a place in LAYERS: {unplaced}"


def test_no_import_runs_back_up_the_stack():
    upward = []
    for path in _modules():
        here = _module_name(path)
        for target in _imported(path):
            if target == "loramux":
                upward.append(f"{here} imports the package __init__")
            elif RANK[_layer(target)] > RANK[_layer(here)]:
                upward.append(f"{here} ({_layer(here)}) imports {target} ({_layer(target)})")
    assert not upward, "\n".join(sorted(upward))


def test_the_public_api_is_complete():
    """Every name in __all__ resolves, and every public name the package offers is in __all__."""
    missing = [name for name in loramux.__all__ if not hasattr(loramux, name)]
    assert not missing
    # submodules become package attributes whenever anything imports them: only other names count
    offered = {n for n in dir(loramux) if not n.startswith("_") and not isinstance(getattr(loramux, n), types.ModuleType)}
    assert offered - set(loramux.__all__) == set()
