"""python/llmprune/_core.pyi describes the compiled extension: the same public names, and for every
function and method the same parameters (names, keyword-only or not, which have defaults) as the
compiled object's text signature."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from llmprune import _core

STUB = Path(__file__).resolve().parents[1] / "python" / "llmprune" / "_core.pyi"

Params = list[tuple[str, bool, bool]]  # (name, keyword-only, has a default)


def _stub() -> tuple[dict[str, ast.AST], dict[str, dict[str, ast.FunctionDef]]]:
    """The stub's declared names (functions, classes, annotated constants) and each class's methods;
    plain assignments are type aliases of the stub only."""
    tree = ast.parse(STUB.read_text())
    names: dict[str, ast.AST] = {}
    methods: dict[str, dict[str, ast.FunctionDef]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        if isinstance(node, ast.ClassDef):
            methods[node.name] = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
    return names, methods


def _stub_params(fn: ast.FunctionDef, drop_self: bool = False) -> Params:
    a = fn.args
    positional = a.posonlyargs + a.args
    first_default = len(positional) - len(a.defaults)
    params = [(p.arg, False, i >= first_default) for i, p in enumerate(positional)]
    params += [(p.arg, True, d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    return params[1:] if drop_self else params


def _compiled_params(obj: object, drop_self: bool = False) -> Params:
    sig = inspect.signature(obj)  # from the compiled object's __text_signature__
    params = [(p.name, p.kind is inspect.Parameter.KEYWORD_ONLY, p.default is not inspect.Parameter.empty) for p in sig.parameters.values()]
    return params[1:] if drop_self else params


def _public(names: set[str] | list[str]) -> set[str]:
    return {n for n in names if not n.startswith("_")} | ({"__version__"} & set(names))


def test_same_public_names() -> None:
    declared, _ = _stub()
    compiled = _public(dir(_core))
    stub = _public(list(declared))
    assert compiled - stub == set(), "exported by the extension but missing from _core.pyi"
    assert stub - compiled == set(), "in _core.pyi but not exported by the extension"


def _functions() -> list[str]:
    declared, _ = _stub()
    return sorted(n for n, node in declared.items() if isinstance(node, ast.FunctionDef))


@pytest.mark.parametrize("name", _functions())
def test_function_signature(name: str) -> None:
    declared, _ = _stub()
    fn = declared[name]
    assert isinstance(fn, ast.FunctionDef)
    assert _stub_params(fn) == _compiled_params(getattr(_core, name))


def _class_methods() -> list[tuple[str, str]]:
    _, methods = _stub()
    return sorted((c, m) for c, ms in methods.items() for m in ms)


@pytest.mark.parametrize(("cls", "method"), _class_methods())
def test_method_signature(cls: str, method: str) -> None:
    _, methods = _stub()
    fn = methods[cls][method]
    compiled_cls = getattr(_core, cls)
    if method == "__init__":
        # the class's own text signature is its constructor's
        assert _stub_params(fn, drop_self=True) == _compiled_params(compiled_cls)
    else:
        assert method in vars(compiled_cls), f"{cls}.{method} is not a method of the extension's class"
        assert _stub_params(fn) == _compiled_params(vars(compiled_cls)[method])


@pytest.mark.parametrize("cls", sorted(c for c, node in _stub()[0].items() if isinstance(node, ast.ClassDef)))
def test_class_methods_declared(cls: str) -> None:
    _, methods = _stub()
    compiled = {n for n, v in vars(getattr(_core, cls)).items() if callable(v) and (not n.startswith("_") or n in ("__enter__", "__exit__"))}
    assert compiled <= set(methods[cls]), f"methods of {cls} missing from _core.pyi: {sorted(compiled - set(methods[cls]))}"
