"""Dataset adapters: native dataset layouts -> ``CaseList``.

``load_dataset(name, dataset_dir, **options)`` dispatches to ``load_derm7pt``, ``load_odir``, ``load_men``
or ``load_manifest`` (your own data: a table of cases with paths); the options are those of the adapter
(see each function and docs/architecture.md).

Example:
    >>> from cmml_monai.data.adapters import load_dataset
    >>> cases = load_dataset("odir", "/data/ODIR-5K", split_file="outputs/split.json")  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable

from cmml_monai.data.adapters.derm7pt import load_derm7pt
from cmml_monai.data.adapters.manifest import load_manifest
from cmml_monai.data.adapters.men import load_men
from cmml_monai.data.adapters.odir import load_odir
from cmml_monai.data.cases import CaseList

__all__ = [
    "ADAPTERS",
    "DATASET_NAMES",
    "load_dataset",
    "adapter_options",
    "load_derm7pt",
    "load_odir",
    "load_men",
    "load_manifest",
]

ADAPTERS: dict[str, Callable[..., CaseList]] = {
    "derm7pt": load_derm7pt,
    "odir": load_odir,
    "men": load_men,
    "manifest": load_manifest,
}
DATASET_NAMES = tuple(ADAPTERS)


def adapter_options(name: str) -> list[str]:
    """The option names accepted by the adapter of ``name`` (besides ``dataset_dir``)."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(ADAPTERS)}")
    return [p for p in inspect.signature(ADAPTERS[name]).parameters if p != "dataset_dir"]


def load_dataset(name: str, dataset_dir: str | os.PathLike, **options: Any) -> CaseList:
    """Load dataset ``name`` (``derm7pt``, ``odir``, ``men``, ``manifest``) from its layout in ``dataset_dir``.

    Raises:
        ValueError: unknown dataset name or option.
        DataError: bad data (layout, column, label, file); the message names what to fix.
    """
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    key = {"odir5k": "odir"}.get(key, key)
    if key not in ADAPTERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(ADAPTERS)}")
    allowed = adapter_options(key)
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"dataset {key!r}: unknown option(s) {bad}; allowed: {allowed}")
    return ADAPTERS[key](dataset_dir, **options)
