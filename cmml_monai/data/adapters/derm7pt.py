"""Derm7pt (``release_v0``) adapter: clinical photo + dermoscopy + metadata, 5 diagnosis groups.

Native layout (read unchanged)::

    release_v0/
      meta/meta.csv                       19 columns, one row per lesion
      meta/{train,valid,test}_indexes.csv one column ``indexes``: 0-based row positions in meta.csv
      images/<folder>/<file>              768x512 JPEG, both ``.jpg`` and ``.JPG`` occur

Rows with ``clinic == derm`` have no real clinical photo: the clinic modality is missing there.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

from cmml_monai.data.adapters.common import FILE_ABSENT, NOT_LISTED, case_ids, clean_cell, drop_all_missing
from cmml_monai.data.cases import TABLE_MODALITY, Case, CaseList, ModalitySpec
from cmml_monai.data.errors import DataError
from cmml_monai.data.table import read_table
from cmml_monai.utils import as_bool

__all__ = [
    "load_derm7pt",
    "DERM7PT_CLASSES",
    "DERM7PT_COLUMNS",
    "DERM7PT_DEFAULT_TABLE_COLUMNS",
    "DERM7PT_LEAKY_COLUMNS",
    "DERM7PT_DIAGNOSIS_GROUPS",
    "derm7pt_group",
]

DERM7PT_CLASSES = ["BCC", "NEV", "MEL", "MISC", "SK"]
DERM7PT_COLUMNS = [
    "case_num",
    "diagnosis",
    "seven_point_score",
    "pigment_network",
    "streaks",
    "pigmentation",
    "regression_structures",
    "dots_and_globules",
    "blue_whitish_veil",
    "vascular_structures",
    "level_of_diagnostic_difficulty",
    "elevation",
    "location",
    "sex",
    "management",
    "clinic",
    "derm",
    "case_id",
    "notes",
]
DERM7PT_DEFAULT_TABLE_COLUMNS = ["elevation", "location", "sex"]
# these columns are decided from (or with) the diagnosis, so they leak the label
DERM7PT_LEAKY_COLUMNS = ["management", "level_of_diagnostic_difficulty", "diagnosis"]
DERM7PT_DIAGNOSIS_GROUPS: dict[str, str] = {
    "basal cell carcinoma": "BCC",
    "blue nevus": "NEV",
    "clark nevus": "NEV",
    "combined nevus": "NEV",
    "congenital nevus": "NEV",
    "dermal nevus": "NEV",
    "recurrent nevus": "NEV",
    "reed or spitz nevus": "NEV",
    "dermatofibroma": "MISC",
    "lentigo": "MISC",
    "melanosis": "MISC",
    "miscellaneous": "MISC",
    "vascular lesion": "MISC",
    "seborrheic keratosis": "SK",
}
_NUMERIC = {"seven_point_score"}
_SPLIT_FILES = {"train": "train_indexes.csv", "valid": "valid_indexes.csv", "test": "test_indexes.csv"}


def derm7pt_group(diagnosis: str) -> str | None:
    """The 5-class group of a Derm7pt ``diagnosis`` string (every ``melanoma...`` is MEL); None if unknown."""
    d = " ".join(str(diagnosis).strip().lower().split())
    if d.startswith("melanoma"):
        return "MEL"
    return DERM7PT_DIAGNOSIS_GROUPS.get(d)


def _image_paths(row: dict, image_dir: str) -> tuple[dict[str, str | None], dict[str, str]]:
    clinic, derm = clean_cell(row["clinic"]), clean_cell(row["derm"])
    paths: dict[str, str | None] = {}
    reasons: dict[str, str] = {}
    for name, rel in (("clinic", clinic), ("derm", derm)):
        if rel is None:
            paths[name], reasons[name] = None, NOT_LISTED
        elif name == "clinic" and derm is not None and str(rel) == str(derm):
            paths[name], reasons[name] = None, "clinic == derm"
        else:
            full = os.path.join(image_dir, *str(rel).replace("\\", "/").split("/"))
            if os.path.isfile(full):
                paths[name] = full
            else:
                paths[name], reasons[name] = None, FILE_ABSENT
    return paths, reasons


def _unlabelled_case(cid: str, split: str, row: dict, image_dir: str, columns: Sequence[str]) -> Case:
    paths, reasons = _image_paths(row, image_dir)
    return Case(cid, split, paths, None, {c: clean_cell(row[c]) for c in columns}, reasons)  # type: ignore[arg-type]


def _find_root(dataset_dir: str) -> str:
    for root in (dataset_dir, os.path.join(dataset_dir, "release_v0")):
        if os.path.isfile(os.path.join(root, "meta", "meta.csv")):
            return root
    raise DataError(
        f"Derm7pt: {dataset_dir} does not hold meta/meta.csv or release_v0/meta/meta.csv; "
        "point dataset_dir at the release_v0 folder (or its parent)"
    )


def load_derm7pt(
    dataset_dir: str | os.PathLike,
    table_columns: Sequence[str] | None = None,
    extra_table_columns: Sequence[str] = (),
    allow_leaky_columns: bool = False,
    id_column: str = "case_num",
    labels: bool = True,
) -> CaseList:
    """Read Derm7pt in its native ``release_v0`` layout.

    Args:
        dataset_dir: the ``release_v0`` folder or its parent.
        table_columns: table feature columns (default ``elevation, location, sex``); ``[]`` for no table.
        extra_table_columns: columns added to the defaults (e.g. ``seven_point_score``, ``pigment_network``).
        allow_leaky_columns: permit ``management`` / ``level_of_diagnostic_difficulty`` as features (they
            leak the label; a warning is issued).
        id_column: column giving the case id (``case_num`` or ``case_id``); values must be unique.
        labels: read the diagnosis. False (inference of new cases): ``diagnosis`` and the index files may be
            absent, every case's label is None and a row in no index file gets split ``""`` instead of
            being dropped.

    Raises:
        DataError: wrong layout, missing column or index file, unknown diagnosis, bad index, duplicated ids,
            or a leaky column without ``allow_leaky_columns``.

    Example:
        >>> cases = load_derm7pt("/data/derm7pt/release_v0")  # doctest: +SKIP
        >>> cases.modality_names
        ['clinic', 'derm', 'table']
    """
    dataset_dir = os.fspath(dataset_dir)
    labels = as_bool(labels, "labels")  # may come from the command line as text
    if not os.path.isdir(dataset_dir):
        raise DataError(f"Derm7pt: dataset_dir {dataset_dir} does not exist; set dataset_dir to the release_v0 folder")
    root = _find_root(dataset_dir)
    columns = list(DERM7PT_DEFAULT_TABLE_COLUMNS if table_columns is None else table_columns)
    columns += [c for c in extra_table_columns if c not in columns]
    _check_leaky(columns, allow_leaky_columns)
    meta_path = os.path.join(root, "meta", "meta.csv")
    label_columns = ["diagnosis"] if labels else []
    meta = read_table(meta_path, required=[id_column, *label_columns, "clinic", "derm", *columns])
    ids = case_ids(meta[id_column], meta_path, id_column)
    split_of = _split_positions(os.path.join(root, "meta"), len(meta), labels)
    image_dir = os.path.join(root, "images")
    if not os.path.isdir(image_dir):
        raise DataError(f"Derm7pt: image folder {image_dir} not found; expected release_v0/images/<folder>/<file>")

    modalities = [ModalitySpec("clinic", "image2d", 3), ModalitySpec("derm", "image2d", 3)]
    if columns:
        modalities.append(ModalitySpec(TABLE_MODALITY, "table", 0))
    cases, dropped = [], []
    for pos, row in enumerate(meta.to_dict(orient="records")):
        cid = ids[pos]
        if not labels:
            cases.append(_unlabelled_case(cid, split_of.get(pos, ""), row, image_dir, columns))
        elif pos not in split_of:
            dropped.append((cid, "not in any split index file"))
        else:
            cases.append(_labelled_case(cid, split_of[pos], row, image_dir, columns, meta_path))

    kept, empty = drop_all_missing(cases, modalities, columns)
    types = {c: ("numeric" if c in _NUMERIC else "categorical") for c in columns if c in DERM7PT_COLUMNS}
    return CaseList(
        name="derm7pt",
        modalities=modalities,
        class_names=list(DERM7PT_CLASSES),
        multi_label=False,
        table_columns=columns,
        cases=kept,
        dropped=dropped + empty,
        table_types=types,
    )


def _check_leaky(columns: Sequence[str], allow_leaky_columns: bool) -> None:
    """Refuse table columns that leak the label (warn when they are explicitly allowed; never the diagnosis)."""
    leaky = [c for c in columns if c in DERM7PT_LEAKY_COLUMNS]
    if leaky and (not allow_leaky_columns or "diagnosis" in leaky):
        raise DataError(
            f"Derm7pt: table column(s) {leaky} leak the label; remove them or set allow_leaky_columns=true"
            + (" (diagnosis is never allowed)" if "diagnosis" in leaky else "")
        )
    if leaky:
        warnings.warn(f"Derm7pt: table columns {leaky} leak the label; results are not a fair benchmark")


def _index_position(ipath: str, value: Any, n_rows: int) -> int:
    """A split file's 0-based row position, checked to be a whole number inside meta.csv."""
    pos = clean_cell(value)
    try:
        pos_i = int(pos)  # type: ignore[arg-type]
        if pos_i != float(pos):  # type: ignore[arg-type]
            raise ValueError
    except (TypeError, ValueError):
        raise DataError(f"{ipath}: index {value!r} is not a whole number; indexes are 0-based row positions") from None
    if not 0 <= pos_i < n_rows:
        raise DataError(f"{ipath}: index {pos_i} is outside meta.csv's {n_rows} rows (0-based positions)")
    return pos_i


def _split_positions(meta_dir: str, n_rows: int, labels: bool) -> dict[int, str]:
    """meta.csv row position -> split, from the three split index files (optional for new cases)."""
    split_of: dict[int, str] = {}
    for split, fname in _SPLIT_FILES.items():
        ipath = os.path.join(meta_dir, fname)
        if not labels and not os.path.isfile(ipath):
            continue  # new cases need no split
        idx = read_table(ipath, required=["indexes"])
        for v in idx["indexes"]:
            pos_i = _index_position(ipath, v, n_rows)
            if pos_i in split_of and split_of[pos_i] != split:
                raise DataError(
                    f"{ipath}: row {pos_i} is already in the {split_of[pos_i]} split; splits must not overlap"
                )
            split_of[pos_i] = split
    return split_of


def _labelled_case(cid: str, split: str, row: dict, image_dir: str, columns: Sequence[str], meta_path: str) -> Case:
    """A case with its diagnosis group as the label; an empty or unknown diagnosis is refused."""
    diagnosis = clean_cell(row["diagnosis"])
    group = derm7pt_group(diagnosis) if diagnosis is not None else None
    if diagnosis is None:
        raise DataError(f"{meta_path}: case {cid}: the diagnosis (label) column is empty; fill it or drop the row")
    if group is None:
        raise DataError(
            f"{meta_path}: case {cid}: diagnosis {diagnosis!r} is not a known Derm7pt diagnosis "
            f"(expected one of {sorted(DERM7PT_DIAGNOSIS_GROUPS)} or melanoma...)"
        )
    paths, reasons = _image_paths(row, image_dir)
    table = {c: clean_cell(row[c]) for c in columns}
    return Case(cid, split, paths, DERM7PT_CLASSES.index(group), table, reasons)
