"""Fingerprint of a dataset's cases: binds saved splits and masks to the data they were made for.

The fingerprint is a SHA-256 over the dataset kind, the modality names, the sorted case ids and, when the
split comes with the data, each case's split, so it changes when a case is added, removed or renamed, moved
to another split, or a modality is added or dropped, and not when the method or the training seed changes
(a split the project makes is saved in the folder of the ids' fingerprint and reused). Split and mask
files record it, and a folder path may hold ``{fingerprint}``: the default ``shared_dir`` is
``outputs/shared/<dataset>-{fingerprint}``, so another dataset of the same kind (or the same cases in
other splits) gets its own masks and split while every method and seed of one dataset shares them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from cmml_monai.data.errors import DataError

__all__ = [
    "FINGERPRINT_FIELD",
    "case_fingerprint",
    "fingerprint_of",
    "ids_fingerprint_of",
    "resolve_fingerprint_path",
    "check_fingerprint",
]

FINGERPRINT_FIELD = "{fingerprint}"
SHORT = 12


def case_fingerprint(
    dataset: str, modality_names: Sequence[str], case_ids: Sequence[str], splits: Mapping[str, str] | None = None
) -> str:
    """The hex SHA-256 of ``dataset``, ``modality_names`` (in order), the sorted ``case_ids`` and, when given,
    each case's split (case id -> split name).

    Example:
        >>> case_fingerprint("derm7pt", ["clinic", "derm", "table"], ["b", "a"])[:12]  # doctest: +SKIP
    """
    payload: dict[str, Any] = {
        "dataset": str(dataset),
        "modalities": [str(m) for m in modality_names],
        "case_ids": sorted(str(c) for c in case_ids),
    }
    if splits is not None:
        payload["splits"] = sorted((str(k), str(v)) for k, v in splits.items())
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode("utf-8")).hexdigest()


def fingerprint_of(case_list: Any) -> str:
    """``case_fingerprint`` of a ``CaseList``: its name, modality names, every case id and, unless the project
    made the split (``split_made``), every case's split."""
    ids = [c.case_id for c in case_list.cases]
    splits = None if getattr(case_list, "split_made", False) else {c.case_id: c.split for c in case_list.cases}
    return case_fingerprint(case_list.name, case_list.modality_names, ids, splits)


def ids_fingerprint_of(case_list: Any) -> str:
    """The fingerprint over ids only, as recorded before splits were covered (to adopt older run folders)."""
    return case_fingerprint(case_list.name, case_list.modality_names, [c.case_id for c in case_list.cases])


def resolve_fingerprint_path(path: str | os.PathLike, fingerprint: str | None) -> str:
    """``path`` with ``{fingerprint}`` replaced by the fingerprint's first 12 hex digits.

    Raises:
        ValueError: ``path`` holds ``{fingerprint}`` but no fingerprint is given.
    """
    path = os.fspath(path)
    if FINGERPRINT_FIELD not in path:
        return path
    if not fingerprint:
        raise ValueError(f"{path}: holds {FINGERPRINT_FIELD} but no case fingerprint is known here")
    return path.replace(FINGERPRINT_FIELD, fingerprint[:SHORT])


def check_fingerprint(path: str, data: Mapping[str, Any], fingerprint: str | None, what: str) -> None:
    """Stop when the file at ``path`` (content ``data``) records another dataset's fingerprint.

    Files without a recorded fingerprint (written before it existed, or by hand) pass; the callers
    then check case ids as before.

    Raises:
        DataError: one line naming the file, both datasets and what to do.
    """
    recorded = data.get("fingerprint")
    if fingerprint is None or recorded is None or recorded == fingerprint:
        return
    made_for = data.get("dataset") or "another dataset"
    raise DataError(
        f"{path}: these {what} belong to another dataset ({made_for}, cases fingerprint {str(recorded)[:SHORT]}), "
        f"not to this one (fingerprint {fingerprint[:SHORT]}); give this dataset its own folder "
        f"(--shared_dir DIR, or leave shared_dir at its default outputs/shared/<dataset>-{FINGERPRINT_FIELD}, "
        "which is keyed to the cases and their split)"
    )
