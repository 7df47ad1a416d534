"""Small helpers shared by the dataset adapters."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Sequence

import numpy as np

from cmml_monai.data.cases import Case, ModalitySpec
from cmml_monai.data.errors import DataError
from cmml_monai.data.table import is_empty_cell

__all__ = [
    "clean_cell",
    "whole_number_text",
    "case_ids",
    "drop_all_missing",
    "check_unique_ids",
    "resolve_path",
    "binary_label",
    "is_dicom_folder",
    "single_table",
    "TABLE_SUFFIXES",
    "FILE_ABSENT",
    "NOT_LISTED",
]

FILE_ABSENT = "file absent"
TABLE_SUFFIXES = (".csv", ".tsv", ".xlsx", ".xls")
NOT_LISTED = "no file listed"


def clean_cell(value: Any) -> Any:
    """A table cell as a plain Python value: None when empty, numpy scalars unwrapped, strings stripped."""
    if is_empty_cell(value):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str):
        return value.strip()
    return value


def whole_number_text(value: Any) -> str:
    """``value`` as text with a whole number's ``.0`` dropped: ``12``, ``12.0`` and ``"12.0"`` all give ``"12"``.

    Spreadsheets and CSV readers turn integer ids and codes into floats (a column with one empty cell
    becomes float), so ``12.0`` and ``12`` must name the same case or grade.
    """
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    return text[:-2] if text.endswith(".0") and text[:-2].isdigit() else text


def case_ids(values: Sequence[Any], source: str, column: str) -> list[str]:
    """The case ids of a table column (``whole_number_text`` of each cell), checked to be present and unique.

    Raises:
        DataError: an empty cell (named by its data row, 1-based) or a repeated id.
    """
    ids = []
    for pos, value in enumerate(values):
        value = clean_cell(value)
        if value is None:
            raise DataError(f"{source}: empty {column!r} in data row {pos + 1}; every row needs a case id")
        ids.append(whole_number_text(value))
    check_unique_ids(ids, source, column)
    return ids


def check_unique_ids(ids: Sequence[str], source: str, column: str) -> None:
    """DataError when an id repeats (before cases are built, so the message names the file and column)."""
    dupes = sorted(k for k, v in Counter(ids).items() if v > 1)
    if dupes:
        raise DataError(
            f"{source}: duplicated case ids in column {column!r}: {dupes[:5]}{' ...' if len(dupes) > 5 else ''}; "
            "each case must appear once"
        )


def drop_all_missing(
    cases: Sequence[Case], modalities: Sequence[ModalitySpec], table_columns: Sequence[str]
) -> tuple[list[Case], list[tuple[str, str]]]:
    """Split cases into those with at least one modality and ``(case_id, reason)`` for the others."""
    kept, dropped = [], []
    for c in cases:
        present = []
        for m in modalities:
            if m.kind == "table":
                present.append(bool(table_columns) and c.table_present(table_columns))
            else:
                present.append(c.paths.get(m.name) is not None)
        if any(present):
            kept.append(c)
        else:
            dropped.append((c.case_id, "every modality missing"))
    return kept, dropped


def resolve_path(dataset_dir: str, path: str | os.PathLike | None) -> str | None:
    """``path`` relative to ``dataset_dir`` unless absolute; None stays None."""
    if path is None:
        return None
    path = os.fspath(path)
    return path if os.path.isabs(path) else os.path.join(dataset_dir, path)


def binary_label(value: Any, case_id: str, column: str, source: str) -> int:
    """A 0/1 label cell as an int (``1``, ``1.0``, ``"0"`` ...).

    Raises:
        DataError: anything else, naming the file, case and column.

    Example:
        >>> binary_label("1.0", "c1", "N", "labels.csv")
        1
    """
    v = clean_cell(value)
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        f = float("nan")
    if f not in (0.0, 1.0):
        raise DataError(f"{source}: case {case_id}: label column {column!r} has {v!r}; labels must be 0 or 1")
    return int(f)


def is_dicom_folder(path: str) -> bool:
    """True when ``path`` is a folder holding at least one DICOM-looking file (``.dcm``/``.dicom``/``.ima`` or
    no extension, as scanners write them)."""
    if not os.path.isdir(path):
        return False
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isfile(full) and (name.lower().endswith((".dcm", ".dicom", ".ima")) or "." not in name):
            return True
    return False


def single_table(dataset_dir: str, source: str, what: str = "clinical table", option: str = "clinical_table") -> str:
    """The one table file (``.csv``/``.tsv``/``.xlsx``/``.xls``) at the top of ``dataset_dir``.

    Raises:
        DataError: none or several, naming ``option`` (the adapter option that picks one).

    Example:
        >>> single_table("/data/MEN", "MEN")  # doctest: +SKIP
        '/data/MEN/clinical.csv'
    """
    found = sorted(
        f
        for f in os.listdir(dataset_dir)
        if f.lower().endswith(TABLE_SUFFIXES)
        and os.path.isfile(os.path.join(dataset_dir, f))
        and not f.startswith((".", "~$"))
    )  # hidden files and Excel lock files
    if len(found) != 1:
        raise DataError(
            f"{source}: expected exactly one {what} (.csv/.xlsx) at the top of {dataset_dir}, "
            f"found {found or 'none'}; set the {option} option"
        )
    return os.path.join(dataset_dir, found[0])
