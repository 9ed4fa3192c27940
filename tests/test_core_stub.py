"""python/loramux/_core.pyi against the compiled loramux._core: every public name of one is in the
other, and every function and method has the same parameters (names, kinds, defaults) as the
`__text_signature__` PyO3 gives it, so the stub type checkers read cannot drift from the module."""

from __future__ import annotations

import ast
import inspect
import pathlib
import typing
from typing import Dict, List

import pytest

import loramux
from loramux import _core

STUB = pathlib.Path(loramux.__file__).with_name("_core.pyi")

# Dunders a class must declare in the stub when the compiled class has them: they change what a
# type checker accepts (len(), iteration, `in`, with, calls). The others (__new__, __repr__, rich
# comparisons, __setattr__, ...) every object has in some form.
PROTOCOL_DUNDERS = {"__len__", "__iter__", "__contains__", "__getitem__", "__call__", "__enter__", "__exit__", "__bool__"}


def _public(name: str) -> bool:
    return not name.startswith("_") or name == "__version__"


def _params(sig: inspect.Signature, drop_first: bool) -> List[tuple]:
    """(name, kind, default) per parameter; annotations are the stub's alone, so they are left out."""
    params = list(sig.parameters.values())[1 if drop_first else 0 :]
    return [(p.name, p.kind, p.default) for p in params]


def _compiled_signature(obj, where: str, problems: List[str]):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        problems.append(f"{where}: the compiled object has no __text_signature__ (give it #[pyo3(signature = ...)])")
        return None


def _compare(stub_fn, compiled, where: str, problems: List[str], stub_self: bool = False, compiled_self: bool = False) -> None:
    """Parameters of a stub function and a compiled one, without `self` where each has one."""
    compiled_sig = _compiled_signature(compiled, where, problems)
    if compiled_sig is None:
        return
    want, got = _params(inspect.signature(stub_fn), stub_self), _params(compiled_sig, compiled_self)
    if want != got:
        problems.append(f"{where}: stub {inspect.signature(stub_fn)} vs compiled {compiled_sig}")


def _annotation_type(annotation: str, namespace: Dict[str, object]) -> type:
    hint = eval(annotation, namespace)  # the stub's own annotation, e.g. "int" or "Tuple[str, ...]"
    return typing.get_origin(hint) or hint


def _check_class(name: str, node: ast.ClassDef, stub_cls: type, cls: type, namespace, problems: List[str]) -> None:
    declared = set()
    for item in node.body:
        if isinstance(item, ast.AnnAssign):
            attr = item.target.id
            declared.add(attr)
            if not inspect.isdatadescriptor(cls.__dict__.get(attr)):
                problems.append(f"{name}.{attr}: declared in the stub, not an attribute of the compiled class")
        elif isinstance(item, ast.FunctionDef):
            declared.add(item.name)
            stub_member = stub_cls.__dict__[item.name]
            where = f"{name}.{item.name}"
            if item.name == "__init__":
                _compare(stub_member, cls, where, problems, stub_self=True)  # the class carries #[new]'s signature
                continue
            if item.name not in cls.__dict__:
                problems.append(f"{where}: declared in the stub, missing from the compiled class")
                continue
            if isinstance(stub_member, staticmethod):
                if not isinstance(cls.__dict__[item.name], staticmethod):
                    problems.append(f"{where}: a staticmethod in the stub only")
                _compare(stub_member.__func__, getattr(cls, item.name), where, problems)
            else:
                _compare(stub_member, cls.__dict__[item.name], where, problems, stub_self=True, compiled_self=True)
    for attr in cls.__dict__:
        if attr not in declared and (_public(attr) and not attr.startswith("__") or attr in PROTOCOL_DUNDERS):
            problems.append(f"{name}.{attr}: in the compiled class, missing from the stub")


def stub_drift(stub_source: str, module) -> List[str]:
    """Everything on which the stub and the compiled module disagree (empty when they agree)."""
    tree = ast.parse(stub_source)
    namespace: Dict[str, object] = {}
    exec(compile(tree, str(STUB), "exec"), namespace)  # a stub is valid Python: defs with `...` bodies
    problems: List[str] = []
    declared = set()
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            name = node.target.id
            declared.add(name)
            if not hasattr(module, name):
                problems.append(f"{name}: declared in the stub, missing from the compiled module")
            elif not isinstance(getattr(module, name), _annotation_type(ast.unparse(node.annotation), namespace)):
                problems.append(f"{name}: stub says {ast.unparse(node.annotation)}, compiled is {type(getattr(module, name)).__name__}")
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
            declared.add(name)
            if not hasattr(module, name):
                problems.append(f"{name}: declared in the stub, missing from the compiled module")
            elif isinstance(node, ast.FunctionDef):
                _compare(namespace[name], getattr(module, name), name, problems)
            else:
                _check_class(name, node, namespace[name], getattr(module, name), namespace, problems)
    for name in dir(module):
        if _public(name) and name not in declared:
            problems.append(f"{name}: in the compiled module, missing from the stub")
    return problems


def test_the_stub_matches_the_compiled_module():
    assert stub_drift(STUB.read_text(), _core) == []


@pytest.mark.parametrize(
    "edit, reported",
    [
        (("def nvrtc_version() -> Tuple[int, int]: ...\n", ""), "nvrtc_version: in the compiled module"),
        (("def load_kernels(device: int)", "def load_kernels(device: int, arch: int)"), "load_kernels: stub"),
        (("replace: bool = False) -> str", "replace: bool = True) -> str"), "AdapterCache.put: stub"),
        (("    max_rank: int = 64,", "    max_rank: int = 32,"), "ModelSpec.__init__: stub"),
        (("    def task_ids(self)", "    def task_ids_(self)"), "AdapterCache.task_ids: in the compiled class"),
        (("KERNEL_MAX_RANK: int", "KERNEL_MAX_RANK: str"), "KERNEL_MAX_RANK: stub says str"),
        (("__version__: str\n", "__version__: str\ndef not_there() -> None: ...\n"), "not_there: declared in the stub"),
        (("    def __len__(self) -> int: ...\n", ""), "AdapterCache.__len__: in the compiled class"),
    ],
)
def test_a_drifted_stub_is_reported(edit, reported):
    source = STUB.read_text()
    old, new = edit
    assert source.count(old) == 1, old
    problems = stub_drift(source.replace(old, new), _core)
    assert any(p.startswith(reported) for p in problems), problems
