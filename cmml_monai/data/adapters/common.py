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
    "FILE_ABSENT",
    "NOT_LISTED",
]

FILE_ABSENT = "file absent"
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
