"""Small helpers shared by the dataset adapters."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Sequence

import numpy as np

from cmml_monai.data.cases import Case, ModalitySpec
from cmml_monai.data.errors import DataError
from cmml_monai.data.table import is_empty_cell

__all__ = ["clean_cell", "drop_all_missing", "check_unique_ids", "resolve_path", "FILE_ABSENT", "NOT_LISTED"]

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
