"""The package is in layers that import only downward (issue #20).

Every module of ``cmml_monai`` is parsed with ``ast`` (nothing is imported, so a cycle cannot hide
behind import order); each ``cmml_monai.X`` import - absolute or relative, at module level or inside
a function, ``import`` or ``from ... import`` - is mapped to the layer of ``X``, and a module that
imports a higher layer than its own is reported as ``file:line``.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "cmml_monai"

#: lowest first; a module may import its own layer and those before it
LAYERS = ("utils", "data", "networks", "losses", "metrics", "engines", "handlers", "evaluation", "deploy")
RANK = {name: i for i, name in enumerate(LAYERS)}


def module_name(path: str) -> str:
    """``cmml_monai/engines/trainer.py`` -> ``cmml_monai.engines.trainer`` (a package's ``__init__`` -> the package)."""
    parts = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    """The layer of a ``cmml_monai`` module: its first sub-name; None for the bare package, whose
    ``__init__`` only carries the version."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """``(line, absolute module)`` of every ``cmml_monai`` import in ``tree``, wherever it stands."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from cmml_monai import handlers`` imports the layer named by the alias
            names = [f"{source}.{a.name}" for a in node.names] if source == PACKAGE else [source]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                yield node.lineno, name


def layer_violations(path: str, source: str | None = None) -> list[str]:
    """``file:line`` messages for the imports of ``path`` that point to a higher (or unknown) layer."""
    if source is None:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    module = module_name(path)
    own = layer_of(module)
    rel = os.path.relpath(path, ROOT)
    out = []
    for line, target in imported_modules(ast.parse(source, rel), module, path.endswith("__init__.py")):
        layer = layer_of(target)
        if layer is None or own is None:
            continue
        if layer not in RANK or own not in RANK:
            out.append(f"{rel}:{line}: {target} - layer {layer if layer not in RANK else own!r} is not in LAYERS")
        elif RANK[layer] > RANK[own]:
            out.append(f"{rel}:{line}: {own} (layer {RANK[own]}) imports {target} ({layer}, layer {RANK[layer]})")
    return out


def package_modules() -> list[str]:
    out = []
    for folder, dirs, files in os.walk(os.path.join(ROOT, PACKAGE)):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        out += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return out


def test_every_module_imports_only_its_own_or_lower_layers():
    modules = package_modules()
    assert len(modules) > 40, f"found only {len(modules)} modules under {PACKAGE}/"
    problems = [p for path in modules for p in layer_violations(path)]
    assert not problems, "imports of a higher layer (see LAYERS in tests/test_layers.py):\n" + "\n".join(problems)


def test_every_package_and_module_has_a_layer():
    top = sorted(
        n[: -len(".py")] if n.endswith(".py") else n
        for n in os.listdir(os.path.join(ROOT, PACKAGE))
        if (n.endswith(".py") and n != "__init__.py") or os.path.isfile(os.path.join(ROOT, PACKAGE, n, "__init__.py"))
    )
    assert sorted(top) == sorted(LAYERS)


@pytest.mark.parametrize("layer", [n for n in LAYERS if n != "utils"])
def test_every_package_re_exports_its_public_names(layer):
    package = importlib.import_module(f"{PACKAGE}.{layer}")
    assert package.__doc__ and package.__doc__.startswith(f"{PACKAGE}.{layer}:"), "the docstring says what it owns"
    assert len(set(package.__all__)) == len(package.__all__)
    missing = [name for name in package.__all__ if not hasattr(package, name)]
    assert not missing, f"{package.__name__}.__all__ names what it does not provide: {missing}"


def test_data_layer_reads_cases_and_summaries_without_torch():
    """``cmml_monai.data`` re-exports lazily: adapters, summaries and mask files do not import torch or MONAI."""
    code = (
        "import sys, cmml_monai.data, cmml_monai.data.adapters, cmml_monai.data.report, cmml_monai.data.missingness\n"
        "from cmml_monai.data import CaseList, summarize\n"
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "path, source, expected",
    [
        ("cmml_monai/engines/x.py", "from cmml_monai.handlers.checkpoint import latest_checkpoint\n", ":1: engines"),
        ("cmml_monai/engines/x.py", "def f():\n    from ..evaluation import plots\n", ":2: engines"),
        ("cmml_monai/data/x.py", "import cmml_monai.networks.utils as u\n", ":1: data"),
        ("cmml_monai/metrics/__init__.py", "from .. import engines\n", "imports cmml_monai.engines"),
        ("cmml_monai/handlers/x.py", "from cmml_monai.nolayer import y\n", "is not in LAYERS"),
        ("cmml_monai/handlers/x.py", "from ..metrics import macro_auc\nfrom . import stats\nimport cmml_monai\n", None),
        ("cmml_monai/evaluation/x.py", "from cmml_monai import data, handlers\nimport numpy\n", None),
    ],
)
def test_checker_finds_upward_imports(path, source, expected):
    """The checker itself: upward imports in every form are reported with file:line; downward ones are not."""
    problems = layer_violations(os.path.join(ROOT, path), source)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and path in problems[0] and expected in problems[0], problems
