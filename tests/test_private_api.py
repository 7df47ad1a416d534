"""No private or protected attribute of another library's object is used in ``cmml_monai`` (issue #30).

Every module is parsed with ``ast`` (nothing is imported). An attribute access ``x._name`` (not a dunder)
is reported as ``file:line`` unless ``x`` is ``self``, ``cls`` or ``super()``, a class or function this
module defines, an argument annotated with such a class, or a module imported from ``cmml_monai``. A short allowlist
names what cannot change here yet, each entry with its reason.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "cmml_monai"

#: ``(path, attribute) -> reason``; keep it short: each entry is a debt, not a permission
ALLOWED: dict[tuple[str, str], str] = {}


def _own_names(tree: ast.AST) -> set[str]:
    """Names bound in the module to its own classes and functions, to arguments annotated with its own
    classes, or to ``cmml_monai`` modules."""
    classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    names = classes | {node.name for node in functions}
    for function in functions:
        for arg in function.args.posonlyargs + function.args.args + function.args.kwonlyargs:
            annotation = arg.annotation
            if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
                annotation = ast.parse(annotation.value, mode="eval").body
            if isinstance(annotation, ast.Name) and annotation.id in classes:
                names.add(arg.arg)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGE)):
            for alias in node.names:
                if alias.name[:1].islower():  # a module or function imported from the package
                    names.add(alias.asname or alias.name)
    return names


def _is_own(value: ast.expr, own: set[str]) -> bool:
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
        return True
    base = value
    while isinstance(base, ast.Attribute):  # cmml_monai.data.dataset._x: the chain's first name decides
        base = base.value
    return isinstance(base, ast.Name) and (base.id in {"self", "cls"} or base.id in own)


def private_accesses(path: str) -> Iterator[tuple[int, str]]:
    """``(line, "x._name")`` of each private attribute access on an object that is not our own."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    own = _own_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
            continue
        if not _is_own(node.value, own):
            yield node.lineno, f"{ast.unparse(node.value)}.{name}"


def scan() -> list[str]:
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for file in sorted(files):
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            rel = os.path.relpath(path, ROOT)
            for line, access in private_accesses(path):
                if (rel, access.rpartition(".")[2]) not in ALLOWED:
                    found.append(f"{rel}:{line}: {access}")
    return found


def test_no_private_attribute_of_library_objects():
    found = scan()
    assert not found, "private attributes of objects that are not ours:\n" + "\n".join(found)


def test_the_scan_finds_a_private_access(tmp_path):
    """The check itself: a library object's ``._x`` is reported, ``self._x`` and a dunder are not."""
    source = tmp_path / "m.py"
    source.write_text(
        "import torch\n"
        "class A:\n"
        "    def f(self, ckpt):\n"
        "        self._mine = ckpt._saved\n"
        "        return super()._g(), A._h, torch.__version__\n"
    )
    assert [access for _, access in private_accesses(str(source))] == ["ckpt._saved"]


def test_allowlist_entries_have_reasons_and_are_used():
    for key, reason in ALLOWED.items():
        assert reason.strip(), key
    hits = set()
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                rel = os.path.relpath(path, ROOT)
                hits |= {(rel, access.rpartition(".")[2]) for _, access in private_accesses(path)}
    assert set(ALLOWED) <= hits, f"stale allowlist entries: {sorted(set(ALLOWED) - hits)}"
