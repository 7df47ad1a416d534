"""Manifest adapter: your own data as one spreadsheet of cases with paths.

Layout::

    <dataset_dir>/
      manifest.csv (or .xlsx; any name, or the manifest option; dataset_dir may also be the file itself)
      ... the images, anywhere: paths are absolute or relative to the manifest's folder

One row per case. Column roles:

- ``id_column``: the case id (unique; ``12`` and ``12.0`` name the same case).
- ``image_columns``: one column per image modality, holding a JPEG/PNG (2D, RGB), a NIfTI file or a DICOM
  series folder (3D, one channel); an empty cell means the modality is missing. Every image modality is
  of one kind (2D or 3D).
- ``table_columns``: clinical columns (numeric or categorical; ``table_types`` declares them, otherwise
  the schema infers them from the train split).
- ``label_columns``: one column of class names (single-label) or several 0/1 columns (multi-label);
  not needed with ``labels=False`` (inference of new cases).
- ``split_column``: ``train``/``valid``/``test`` per case; without it a seeded, label-stratified split is
  made (and saved to ``split_file`` when given, reused from it later).

Roles not given are inferred (:func:`~cmml_monai.data.adapters.roles.infer_roles`, printed by
``scripts/inspect_data.py``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

import pandas as pd

from cmml_monai.data.adapters.common import (
    NOT_LISTED,
    binary_label,
    case_ids,
    clean_cell,
    resolve_path,
    single_table,
    whole_number_text,
)
from cmml_monai.data.adapters.roles import (
    IMAGE_CHANNELS,
    MANIFEST_ID_NAMES,
    MANIFEST_LABEL_NAMES,
    MANIFEST_SPLIT_NAMES,
    ManifestRoles,
    infer_roles,
    path_kind,
)
from cmml_monai.data.adapters.splits import DEFAULT_FRACTIONS, load_or_make_split, normalise_split_name
from cmml_monai.data.cases import TABLE_MODALITY, Case, CaseList, ModalitySpec
from cmml_monai.data.errors import DataError
from cmml_monai.data.fingerprint import case_fingerprint
from cmml_monai.data.table import read_table
from cmml_monai.utils import as_bool

__all__ = [
    "load_manifest",
    "infer_roles",
    "ManifestRoles",
    "MANIFEST_NAME",
    "MANIFEST_ID_NAMES",
    "MANIFEST_LABEL_NAMES",
    "MANIFEST_SPLIT_NAMES",
    "MANIFEST_INPUT_OPTIONS",
    "path_kind",
    "manifest_location",
    "manifest_roles",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest"
#: the options that define the network's inputs: inference reuses the training run's values of these
MANIFEST_INPUT_OPTIONS = ("id_column", "image_columns", "table_columns", "table_types", "image_kind")
_CHANNELS = IMAGE_CHANNELS


def _class_names(values: Sequence[str], given: Sequence[Any] | None) -> list[str]:
    if given is not None:
        return [whole_number_text(clean_cell(c)) for c in given]

    def order(name: str) -> tuple[int, float, str]:  # numbers in numeric order, then text
        try:
            return (0, float(name), name)
        except ValueError:
            return (1, 0.0, name)

    return sorted(set(values), key=order)


def manifest_location(dataset_dir: str, manifest: str | os.PathLike | None) -> tuple[str, str]:
    """(the manifest file, the folder its relative paths are read from) for ``dataset_dir`` (the file itself or
    its folder) and the ``manifest`` option.

    Example:
        >>> manifest_location("/data/cases.csv", None)  # doctest: +SKIP
        ('/data/cases.csv', '/data')
    """
    if os.path.isfile(dataset_dir):
        if manifest is not None:
            raise ValueError(f"dataset_dir {dataset_dir} is a file (the manifest); do not set the manifest option too")
        return dataset_dir, os.path.dirname(os.path.abspath(dataset_dir))
    if not os.path.isdir(dataset_dir):
        raise DataError(f"manifest: dataset_dir {dataset_dir} does not exist; give the manifest file or its folder")
    if manifest is None:
        path = single_table(dataset_dir, "manifest", what="manifest table", option="manifest")
    else:
        path = resolve_path(dataset_dir, manifest)  # type: ignore[assignment]
    return path, os.path.dirname(os.path.abspath(path))


def manifest_roles(
    dataset_dir: str | os.PathLike,
    manifest: str | os.PathLike | None = None,
    sheet: str | int | None = None,
    labels: bool = True,
    **given: Any,
) -> ManifestRoles:
    """The column roles :func:`load_manifest` would use (``given`` as there, the others inferred); what
    ``scripts/inspect_data.py`` prints.

    Example:
        >>> manifest_roles("/data/cases.csv").to_options()  # doctest: +SKIP
        {'id_column': 'case_id', 'image_columns': {'t1c': 't1c'}, ...}
    """
    path, base_dir = manifest_location(os.path.expanduser(os.fspath(dataset_dir)), manifest)
    try:
        return infer_roles(read_table(path, sheet=sheet), base_dir, as_bool(labels, "labels"), given)
    except DataError as e:
        raise DataError(f"{path}: {str(e).removeprefix('manifest: ')}") from None


def load_manifest(
    dataset_dir: str | os.PathLike,
    manifest: str | os.PathLike | None = None,
    sheet: str | int | None = None,
    id_column: str | None = None,
    image_columns: Sequence[str] | Mapping[str, str] | None = None,
    image_kind: str | None = None,
    table_columns: Sequence[str] | None = None,
    table_types: Mapping[str, str] | None = None,
    label_columns: str | Sequence[str] | None = None,
    class_names: Sequence[Any] | None = None,
    split_column: str | bool | None = None,
    split_file: str | os.PathLike | None = None,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    split_seed: int = 0,
    labels: bool = True,
) -> CaseList:
    """Read the cases of a manifest table (see the module docstring for the layout and column roles).

    Args:
        dataset_dir: the manifest file, or the folder holding it (then ``manifest`` names it; default the
            single table file at the top of the folder).
        manifest: the manifest file (absolute or relative to ``dataset_dir``).
        sheet: sheet of an Excel manifest (default the first).
        id_column, image_columns, table_columns, label_columns, split_column: column roles (see
            :func:`infer_roles`); None infers the role. ``image_columns`` may map modality names to columns.
            ``split_column`` false: no split column even if one is called ``split``.
        image_kind: ``"image2d"`` or ``"image3d"``; None infers it from the paths.
        table_types: column -> ``"numeric"`` / ``"categorical"`` (others are inferred when the schema is fit).
        class_names: single-label classes in index order (default: the label values, sorted; numbers
            numerically). With several label columns the classes are the column names.
        split_file: JSON split used without a split column (reused when it exists, written when given).
        split_fractions: train, valid, test fractions of the made split.
        split_seed: seed of the made split.
        labels: read the labels. False (inference of new cases): label columns may be absent, every label
            is None and, without a split column, every case's split is ``""``.

    Raises:
        DataError: a named column that is not in the manifest, a path that does not exist, a case with no
            modality at all, a label outside ``class_names`` (or not 0/1), a bad split value, repeated ids.
        ValueError: a bad option value.

    Example:
        >>> cases = load_manifest("/data/cases.csv", image_columns=["t1c", "t2w"], label_columns="grade",
        ...                       split_file="outputs/split.json")  # doctest: +SKIP
        >>> cases.modality_names
        ['t1c', 't2w', 'table']
    """
    dataset_dir = os.path.expanduser(os.fspath(dataset_dir))
    labels = as_bool(labels, "labels")  # may come from the command line as text
    path, base_dir = manifest_location(dataset_dir, manifest)
    df = read_table(path, sheet=sheet)
    if df.empty:
        raise DataError(f"{path}: the manifest has no rows")
    given = dict(id_column=id_column, image_columns=image_columns, image_kind=image_kind)
    given.update(table_columns=table_columns, label_columns=label_columns, split_column=split_column)
    roles = _logged_roles(df, path, base_dir, labels, given)
    declared = _declared_types(table_types, roles)
    rows = df.to_dict(orient="records")
    ids = case_ids([row[roles.id_column] for row in rows], path, roles.id_column)
    label_text, classes = _label_classes(rows, ids, roles, labels, class_names, path)
    modalities = _modalities(roles)
    read = _ManifestRows(path, base_dir, roles, labels, label_text, classes)
    for cid, row in zip(ids, rows):
        read.add(cid, row)
    read.check()
    multi_label = len(roles.label_columns) > 1
    _set_splits(read, labels, multi_label, [m.name for m in modalities], split_file, split_fractions, split_seed)
    return CaseList(
        name=MANIFEST_NAME,
        modalities=modalities,
        class_names=classes,
        multi_label=multi_label,
        table_columns=list(roles.table_columns),
        cases=read.cases,
        dropped=read.dropped,
        table_types=declared,
        split_made=bool(roles.split_column is None and labels),
    )


def _logged_roles(df: pd.DataFrame, path: str, base_dir: str, labels: bool, given: dict[str, Any]) -> ManifestRoles:
    """:func:`infer_roles` with errors naming the manifest file; inferred roles said in the log."""
    try:
        roles = infer_roles(df, base_dir, labels, given)
    except DataError as e:
        raise DataError(f"{path}: {str(e).removeprefix('manifest: ')}") from None
    if roles.inferred:  # say what was guessed, so a wrong guess is seen before training
        logger.info(
            "%s: column roles %s (inferred: %s; set them in dataset_options to fix them)",
            path,
            json.dumps(roles.to_options()),
            ", ".join(roles.inferred),
        )
    return roles


def _declared_types(table_types: Mapping[str, str] | None, roles: ManifestRoles) -> dict[str, str]:
    """The ``table_types`` option, checked against the table columns."""
    declared = {str(k): str(v) for k, v in dict(table_types or {}).items()}
    bad = {k: v for k, v in declared.items() if k not in roles.table_columns or v not in ("numeric", "categorical")}
    if bad:
        raise ValueError(
            f"table_types {bad}: keys must be table columns {roles.table_columns} and values 'numeric' or 'categorical'"
        )
    return declared


def _label_classes(
    rows: list[dict], ids: list[str], roles: ManifestRoles, labels: bool, class_names: Sequence[Any] | None, path: str
) -> tuple[dict[str, str], list[str]]:
    """(case id -> single-label text, the class names in index order)."""
    if len(roles.label_columns) > 1:
        return {}, list(roles.label_columns)
    if not labels:
        return {}, [whole_number_text(clean_cell(c)) for c in class_names or []]
    label_text: dict[str, str] = {}
    (label_col,) = roles.label_columns
    for cid, row in zip(ids, rows):
        value = clean_cell(row[label_col])
        if value is not None:
            label_text[cid] = whole_number_text(value)
    classes = _class_names(list(label_text.values()), class_names)
    if len(classes) < 2:
        raise DataError(
            f"{path}: label column {label_col!r} has {len(classes)} class(es) {classes}; "
            "at least 2 are needed (or set class_names)"
        )
    return label_text, classes


def _modalities(roles: ManifestRoles) -> list[ModalitySpec]:
    kind = roles.image_kind
    channels = _CHANNELS[kind]  # type: ignore[index]
    modalities = [ModalitySpec(name, kind, channels) for name in roles.image_columns]  # type: ignore[arg-type]
    if roles.table_columns:
        modalities.append(ModalitySpec(TABLE_MODALITY, "table", 0))
    return modalities


class _ManifestRows:
    """The manifest's rows read into cases; bad rows collected so that all are named at once."""

    def __init__(
        self,
        path: str,
        base_dir: str,
        roles: ManifestRoles,
        labels: bool,
        label_text: Mapping[str, str],
        classes: list[str],
    ) -> None:
        self.path, self.base_dir, self.roles, self.labels = path, base_dir, roles, labels
        self.label_text, self.classes = label_text, classes
        self.cases: list[Case] = []
        self.dropped: list[tuple[str, str]] = []
        self.absent: list[str] = []
        self.empty: list[str] = []
        self.split_of: dict[str, str] = {}

    def _paths(self, cid: str, row: Mapping[str, Any]) -> tuple[dict[str, str | None], dict[str, str]]:
        paths: dict[str, str | None] = {}
        reasons: dict[str, str] = {}
        for name, col in self.roles.image_columns.items():
            value = clean_cell(row[col])
            if value is None:
                paths[name], reasons[name] = None, NOT_LISTED
                continue
            full = os.path.expanduser(resolve_path(self.base_dir, str(value)))  # type: ignore[arg-type]
            if not os.path.exists(full):
                self.absent.append(f"case {cid} column {col!r}: {full}")
            paths[name] = full
        return paths, reasons

    def _label(self, case: Case, row: Mapping[str, Any]) -> bool:
        """Set the case's label; False when the case is dropped (its label is empty)."""
        cid, roles = case.case_id, self.roles
        if len(roles.label_columns) > 1:
            case.label = [binary_label(row[c], cid, c, self.path) for c in roles.label_columns]
        elif cid not in self.label_text:
            self.dropped.append((cid, "label empty"))
            return False
        elif self.label_text[cid] not in self.classes:
            raise DataError(
                f"{self.path}: case {cid}: label {self.label_text[cid]!r} in column {roles.label_columns[0]!r}"
                f" is not one of class_names {self.classes}"
            )
        else:
            case.label = self.classes.index(self.label_text[cid])
        return True

    def _split(self, cid: str, row: Mapping[str, Any]) -> None:
        column = self.roles.split_column
        raw = clean_cell(row[column])  # type: ignore[index]
        name = normalise_split_name(raw) if raw is not None else None
        if name is None and (self.labels or raw is not None):
            raise DataError(
                f"{self.path}: case {cid}: split {raw!r} in column {column!r}; use train, "
                "valid or test (or set split_column false to make a split)"
            )
        self.split_of[cid] = name or ""

    def add(self, cid: str, row: Mapping[str, Any]) -> None:
        """Read one row: its case is kept, dropped (empty label) or collected as empty (no modality)."""
        paths, reasons = self._paths(cid, row)
        table = {c: clean_cell(row[c]) for c in self.roles.table_columns}
        case = Case(cid, "", paths, None, table, reasons)
        if all(p is None for p in paths.values()) and not case.table_present(self.roles.table_columns):
            self.empty.append(cid)
            return
        if self.labels and not self._label(case, row):
            return
        if self.roles.split_column is not None:
            self._split(cid, row)
        self.cases.append(case)

    def check(self) -> None:
        """Stop here, before anything is trained or written, naming all missing paths / empty cases at once."""
        if self.absent:
            raise DataError(
                f"{self.path}: {len(self.absent)} path(s) do not exist, e.g. {self.absent[0]}; fix them (relative "
                f"paths are read from {self.base_dir}) or empty the cell to mark the modality missing"
            )
        if self.empty:
            raise DataError(
                f"{self.path}: {len(self.empty)} case(s) have no modality at all (every image and clinical cell "
                f"empty), e.g. {self.empty[:3]}; fill one or remove the row"
            )


def _set_splits(
    read: _ManifestRows,
    labels: bool,
    multi_label: bool,
    modality_names: list[str],
    split_file: str | os.PathLike | None,
    split_fractions: Sequence[float],
    split_seed: int,
) -> None:
    """Set each case's split: the split column's, ``""`` for new cases without labels, else a made split."""
    if read.roles.split_column is not None:
        split = read.split_of
    elif not labels:
        split = {c.case_id: "" for c in read.cases}
    else:
        split = _made_split(read, multi_label, modality_names, split_file, split_fractions, split_seed)
    for c in read.cases:
        c.split = split[c.case_id]


def _made_split(
    read: _ManifestRows,
    multi_label: bool,
    modality_names: list[str],
    split_file: str | os.PathLike | None,
    split_fractions: Sequence[float],
    split_seed: int,
) -> dict[str, str]:
    """The seeded, label-stratified split of the kept cases (reused from ``split_file`` when it matches)."""
    kept_ids = [c.case_id for c in read.cases]
    fingerprint = case_fingerprint(MANIFEST_NAME, modality_names, kept_ids)
    keys = ["".join(map(str, c.label)) if multi_label else str(c.label) for c in read.cases]  # type: ignore[arg-type]
    return load_or_make_split(kept_ids, keys, split_file, split_fractions, split_seed, fingerprint, MANIFEST_NAME)
