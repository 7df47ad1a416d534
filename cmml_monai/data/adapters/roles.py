"""Column roles of a manifest table: the id, image, clinical, label and split columns.

Roles not given are inferred: the id is a column named ``case_id``, ``id``, ``case`` ... (else the first
column), the label ``label``, ``diagnosis``, ``grade`` ..., the split ``split``; image columns are those
whose values are image paths; the other columns are clinical (docs/datasets.md).

Example:
    >>> roles = infer_roles(read_table("cases.csv"), ".")  # doctest: +SKIP
    >>> roles.to_options()["image_columns"]
    {'t1c': 't1c', 't2w': 't2w'}
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import pandas as pd

from cmml_monai.data.adapters.common import clean_cell, resolve_path
from cmml_monai.data.cases import TABLE_MODALITY
from cmml_monai.data.errors import DataError
from cmml_monai.data.formats import IMAGE_2D_SUFFIXES, VOLUME_SUFFIXES, path_suffix

__all__ = [
    "ManifestRoles",
    "infer_roles",
    "path_kind",
    "MANIFEST_ID_NAMES",
    "MANIFEST_LABEL_NAMES",
    "MANIFEST_SPLIT_NAMES",
    "IMAGE_CHANNELS",
]

MANIFEST_ID_NAMES = ("case_id", "caseid", "id", "case", "patient_id", "patient", "subject_id", "subject")
MANIFEST_LABEL_NAMES = ("label", "labels", "diagnosis", "grade", "target", "class", "y")
MANIFEST_SPLIT_NAMES = ("split", "set", "subset")
#: image kind -> channels of one modality: RGB photos; one MRI/CT sequence
IMAGE_CHANNELS = {"image2d": 3, "image3d": 1}


def path_kind(value: Any, base_dir: str | None = None) -> str | None:
    """``"image2d"`` for a 2D image file name, ``"image3d"`` for a volume file name or an existing folder (a
    DICOM series), None for anything else (empty, a number, free text).

    Example:
        >>> path_kind("img/1.JPG"), path_kind("t1c.nii.gz"), path_kind(62.0)
        ('image2d', 'image3d', None)
    """
    value = clean_cell(value)
    if not isinstance(value, str) or not value:
        return None
    suffix = path_suffix(value)
    if suffix in IMAGE_2D_SUFFIXES:
        return "image2d"
    if suffix in VOLUME_SUFFIXES:
        return "image3d"
    # a DICOM series folder has no suffix: only a folder that exists counts, so free text is not taken
    folder = None if base_dir is None else resolve_path(base_dir, value)
    if folder is not None and os.path.isdir(os.path.expanduser(folder)):
        return "image3d"
    return None


@dataclass
class ManifestRoles:
    """The role of each manifest column.

    Args:
        id_column: the case id column.
        image_columns: modality name -> column (the name is the column's unless mapped).
        table_columns: clinical feature columns.
        label_columns: one column of class names, or several 0/1 columns (multi-label); empty without labels.
        split_column: the split column, or None (a split is made).
        image_kind: ``"image2d"`` or ``"image3d"``.
        inferred: the roles that were inferred rather than given.

    Example:
        >>> ManifestRoles("id", {"t1c": "t1c"}, ["age"], ["grade"], None, "image3d").to_options()["split_column"]
    """

    id_column: str
    image_columns: dict[str, str]
    table_columns: list[str]
    label_columns: list[str]
    split_column: str | None
    image_kind: str | None
    inferred: list[str] = field(default_factory=list)

    def to_options(self) -> dict[str, Any]:
        """The roles as ``dataset_options`` to put in an overlay (what ``inspect_data`` prints)."""
        out = asdict(self)
        out.pop("inferred")
        return out


def _named(columns: Sequence[str], names: Sequence[str]) -> str | None:
    by_key = {str(c).strip().lower().replace(" ", "_").replace("-", "_"): c for c in columns}
    return next((by_key[n] for n in names if n in by_key), None)


def _column_kind(df: pd.DataFrame, column: str, base_dir: str) -> tuple[str | None, bool]:
    """(kind of the column's non-empty values, whether every non-empty value is a path of that kind)."""
    values = [v for v in df[column] if clean_cell(v) is not None]
    found = [path_kind(v, base_dir) for v in values]
    kinds = {k for k in found if k is not None}
    # a value of no known kind still counts as a path when it looks like one (a DICOM folder that does not
    # exist here): the column is then reported for its missing paths, not mistaken for a clinical column
    unknown = [clean_cell(v) for v, k in zip(values, found) if k is None]
    if not kinds or not all(isinstance(v, str) and ("/" in v or "\\" in v) for v in unknown):
        return None, False
    if len(kinds) > 1:
        examples = {path_kind(v, base_dir): clean_cell(v) for v in values}
        raise DataError(
            f"manifest column {column!r} mixes 2D images ({examples['image2d']!r}) and volumes "
            f"({examples['image3d']!r}); one column is one modality of one kind"
        )
    return kinds.pop(), True


def _check_present(columns: Sequence[str], role: str, names: Sequence[str]) -> None:
    """Refuse a column given for ``role`` that the manifest lacks, suggesting the closest name."""
    for name in names:
        if name not in columns:
            close = difflib.get_close_matches(str(name), columns, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(
                f"manifest: column {name!r} given as {role} is not in the manifest{hint}; its columns are {columns}"
            )


def _id_column(given: Mapping[str, Any], columns: list[str], inferred: list[str]) -> str:
    id_column = given.get("id_column")
    if id_column is None:
        id_column = _named(columns, MANIFEST_ID_NAMES) or columns[0]
        inferred.append("id_column")
    _check_present(columns, "id_column", [id_column])
    return id_column


def _split_column(given: Mapping[str, Any], columns: list[str], inferred: list[str]) -> str | None:
    split_column = given.get("split_column")
    if split_column is None:
        split_column = _named(columns, MANIFEST_SPLIT_NAMES)
        inferred.append("split_column")
    elif split_column is False or split_column == "":
        split_column = None  # explicitly none: make a split even if a column is called "split"
    else:
        _check_present(columns, "split_column", [split_column])
    return split_column


def _label_columns(given: Mapping[str, Any], columns: list[str], labels: bool, inferred: list[str]) -> list[str]:
    label_columns = given.get("label_columns")
    if isinstance(label_columns, str):
        label_columns = [label_columns]
    if not labels:
        return [c for c in (label_columns or []) if c in columns]  # a new-case manifest has none
    if label_columns is None:
        found = _named(columns, MANIFEST_LABEL_NAMES)
        if found is None:
            raise DataError(
                f"manifest: no label column found (looked for {list(MANIFEST_LABEL_NAMES)}); set "
                f"dataset_options label_columns to one of {columns} (or to several 0/1 columns)"
            )
        inferred.append("label_columns")
        return [found]
    label_columns = [str(c) for c in label_columns]
    _check_present(columns, "label_columns", label_columns)
    return label_columns


def _image_columns(
    df: pd.DataFrame, base_dir: str, given: Mapping[str, Any], taken: set[str], inferred: list[str]
) -> dict[str, str]:
    """Modality name -> column: the given ones, or every column not ``taken`` whose values are image paths."""
    columns = [str(c) for c in df.columns]
    image_columns = given.get("image_columns")
    if image_columns is None:
        image_columns = {c: c for c in columns if c not in taken and _column_kind(df, c, base_dir)[1]}
        inferred.append("image_columns")
    elif isinstance(image_columns, Mapping):
        image_columns = {str(k): str(v) for k, v in image_columns.items()}
    else:
        image_columns = {str(c): str(c) for c in image_columns}
    _check_present(columns, "image_columns", list(image_columns.values()))
    if not image_columns:
        raise DataError(
            f"manifest: no image column found (a column of .jpg/.png/.nii.gz paths or DICOM folders); set "
            f"dataset_options image_columns to some of {columns}"
        )
    if TABLE_MODALITY in image_columns:
        raise DataError(
            f"manifest: {TABLE_MODALITY!r} names the clinical table; map that image column to another "
            'modality name, e.g. image_columns {"scan": "table"}'
        )
    return image_columns


def _image_kind(
    df: pd.DataFrame, base_dir: str, image_columns: Mapping[str, str], kind: str | None, inferred: list[str]
) -> str:
    """The one kind of every image column: ``kind`` when given (checked against the paths), else inferred."""
    kinds = {}
    for c in image_columns.values():
        c_kind, _ = _column_kind(df, c, base_dir)
        if c_kind is not None:
            kinds[c] = c_kind
    if kind is not None:
        wrong = {c: k for c, k in kinds.items() if k != kind}
        if wrong:
            raise DataError(f"manifest: image_kind is {kind!r} but columns {wrong} hold the other kind of image")
        return kind
    found = sorted(set(kinds.values()))
    if len(found) > 1:
        raise DataError(
            f"manifest: image columns hold both 2D images and volumes ({kinds}); every image modality must "
            "be of one kind: train 2D and 3D modalities as separate datasets"
        )
    if not found:
        raise DataError(
            f"manifest: cannot tell whether image columns {list(image_columns.values())} hold 2D "
            "images or volumes; set dataset_options image_kind to 'image2d' or 'image3d'"
        )
    inferred.append("image_kind")
    return found[0]


def _table_columns(given: Mapping[str, Any], columns: list[str], taken: set[str], inferred: list[str]) -> list[str]:
    table_columns = given.get("table_columns")
    if table_columns is None:
        inferred.append("table_columns")
        return [c for c in columns if c not in taken]
    table_columns = [str(c) for c in table_columns]
    _check_present(columns, "table_columns", table_columns)
    return table_columns


def _check_one_role_each(roles: Mapping[str, Sequence[str]]) -> None:
    """Refuse a column given two roles (a label column as a feature would leak the label)."""
    seen: dict[str, str] = {}
    for role, cols in roles.items():
        for c in cols:
            if c in seen and seen[c] != role:
                raise DataError(
                    f"manifest: column {c!r} is given as both {seen[c]} and {role}; give it one role"
                    + (" (a label column as a feature leaks the label)" if "label_columns" in (role, seen[c]) else "")
                )
            seen[c] = role


def infer_roles(
    df: pd.DataFrame,
    base_dir: str,
    labels: bool = True,
    given: Mapping[str, Any] | None = None,
) -> ManifestRoles:
    """Column roles of a manifest table: those in ``given`` (``load_manifest``'s options) as they are, the
    others inferred.

    Args:
        df: the manifest (``cmml_monai.data.table.read_table``).
        base_dir: the folder relative paths are read from.
        labels: whether label columns are wanted (False: none are inferred).
        given: explicit roles: ``id_column``, ``image_columns``, ``table_columns``, ``label_columns``,
            ``split_column``, ``image_kind``.

    Raises:
        DataError: a named column is not in the manifest (the closest column names are suggested), a column
            in two roles, no image column, or image columns of both kinds.

    Example:
        >>> roles = infer_roles(read_table("cases.csv"), ".")  # doctest: +SKIP
        >>> roles.image_columns
        {'t1c': 't1c', 't2w': 't2w'}
    """
    given = {k: v for k, v in dict(given or {}).items() if v is not None}
    columns = [str(c) for c in df.columns]
    inferred: list[str] = []
    id_column = _id_column(given, columns, inferred)
    split_column = _split_column(given, columns, inferred)
    label_columns = _label_columns(given, columns, labels, inferred)
    taken = {id_column, *label_columns, *([split_column] if split_column else [])}
    kind = given.get("image_kind")
    if kind is not None and kind not in IMAGE_CHANNELS:
        raise ValueError(f"image_kind must be 'image2d' or 'image3d', got {kind!r}")
    image_columns = _image_columns(df, base_dir, given, taken, inferred)
    kind = _image_kind(df, base_dir, image_columns, kind, inferred)
    table_columns = _table_columns(given, columns, taken | set(image_columns.values()), inferred)
    _check_one_role_each(
        {
            "id_column": [id_column],
            "label_columns": label_columns,
            "image_columns": list(image_columns.values()),
            "table_columns": table_columns,
            "split_column": [split_column] if split_column else [],
        }
    )
    return ManifestRoles(
        str(id_column),
        image_columns,
        table_columns,
        label_columns,
        str(split_column) if split_column else None,
        kind,
        inferred,
    )
