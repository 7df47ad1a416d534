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

Roles not given are inferred (:func:`infer_roles`, printed by ``scripts/inspect_data.py``): the id is a
column named ``case_id``, ``id``, ``case`` ... (else the first column), the label ``label``, ``diagnosis``,
``grade`` ..., the split ``split``; image columns are those whose values are image paths; the other
columns are clinical.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
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
from cmml_monai.data.adapters.splits import DEFAULT_FRACTIONS, load_or_make_split, normalise_split_name
from cmml_monai.data.cases import TABLE_MODALITY, Case, CaseList, ModalitySpec
from cmml_monai.data.errors import DataError
from cmml_monai.data.fingerprint import case_fingerprint
from cmml_monai.data.formats import IMAGE_2D_SUFFIXES, VOLUME_SUFFIXES, path_suffix
from cmml_monai.data.table import read_table
from cmml_monai.utils import as_bool

__all__ = [
    "load_manifest",
    "infer_roles",
    "ManifestRoles",
    "MANIFEST_NAME",
    "MANIFEST_ID_NAMES",
    "MANIFEST_LABEL_NAMES",
    "MANIFEST_INPUT_OPTIONS",
    "path_kind",
    "manifest_location",
    "manifest_roles",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest"
MANIFEST_ID_NAMES = ("case_id", "caseid", "id", "case", "patient_id", "patient", "subject_id", "subject")
MANIFEST_LABEL_NAMES = ("label", "labels", "diagnosis", "grade", "target", "class", "y")
MANIFEST_SPLIT_NAMES = ("split", "set", "subset")
#: the options that define the network's inputs: inference reuses the training run's values of these
MANIFEST_INPUT_OPTIONS = ("id_column", "image_columns", "table_columns", "table_types", "image_kind")
_CHANNELS = {"image2d": 3, "image3d": 1}  # RGB photos; one MRI/CT sequence


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

    def check(role: str, names: Sequence[str]) -> None:
        for name in names:
            if name not in columns:
                close = difflib.get_close_matches(str(name), columns, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DataError(
                    f"manifest: column {name!r} given as {role} is not in the manifest{hint}; its columns are {columns}"
                )

    id_column = given.get("id_column")
    if id_column is None:
        id_column = _named(columns, MANIFEST_ID_NAMES) or columns[0]
        inferred.append("id_column")
    check("id_column", [id_column])

    split_column = given.get("split_column")
    if split_column is None:
        split_column = _named(columns, MANIFEST_SPLIT_NAMES)
        inferred.append("split_column")
    elif split_column is False or split_column == "":
        split_column = None  # explicitly none: make a split even if a column is called "split"
    else:
        check("split_column", [split_column])

    label_columns = given.get("label_columns")
    if isinstance(label_columns, str):
        label_columns = [label_columns]
    if not labels:
        label_columns = [c for c in (label_columns or []) if c in columns]  # a new-case manifest has none
    elif label_columns is None:
        found = _named(columns, MANIFEST_LABEL_NAMES)
        if found is None:
            raise DataError(
                f"manifest: no label column found (looked for {list(MANIFEST_LABEL_NAMES)}); set "
                f"dataset_options label_columns to one of {columns} (or to several 0/1 columns)"
            )
        label_columns = [found]
        inferred.append("label_columns")
    else:
        label_columns = [str(c) for c in label_columns]
        check("label_columns", label_columns)

    taken = {id_column, *label_columns, *([split_column] if split_column else [])}
    image_columns = given.get("image_columns")
    kind = given.get("image_kind")
    if kind is not None and kind not in _CHANNELS:
        raise ValueError(f"image_kind must be 'image2d' or 'image3d', got {kind!r}")
    if image_columns is None:
        image_columns = {}
        for c in columns:
            if c in taken:
                continue
            if _column_kind(df, c, base_dir)[1]:  # every non-empty value is an image path
                image_columns[c] = c
        inferred.append("image_columns")
    elif isinstance(image_columns, Mapping):
        image_columns = {str(k): str(v) for k, v in image_columns.items()}
    else:
        image_columns = {str(c): str(c) for c in image_columns}
    check("image_columns", list(image_columns.values()))
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
    kinds = {}
    for c in image_columns.values():
        c_kind, _ = _column_kind(df, c, base_dir)
        if c_kind is not None:
            kinds[c] = c_kind
    if kind is None:
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
        kind = found[0]
        inferred.append("image_kind")
    else:
        wrong = {c: k for c, k in kinds.items() if k != kind}
        if wrong:
            raise DataError(f"manifest: image_kind is {kind!r} but columns {wrong} hold the other kind of image")

    table_columns = given.get("table_columns")
    if table_columns is None:
        taken |= set(image_columns.values())
        table_columns = [c for c in columns if c not in taken]
        inferred.append("table_columns")
    else:
        table_columns = [str(c) for c in table_columns]
        check("table_columns", table_columns)

    roles = {
        "id_column": [id_column],
        "label_columns": label_columns,
        "image_columns": list(image_columns.values()),
        "table_columns": table_columns,
        "split_column": [split_column] if split_column else [],
    }
    seen: dict[str, str] = {}
    for role, cols in roles.items():
        for c in cols:
            if c in seen and seen[c] != role:
                raise DataError(
                    f"manifest: column {c!r} is given as both {seen[c]} and {role}; give it one role"
                    + (" (a label column as a feature leaks the label)" if "label_columns" in (role, seen[c]) else "")
                )
            seen[c] = role
    return ManifestRoles(
        str(id_column),
        image_columns,
        table_columns,
        label_columns,
        str(split_column) if split_column else None,
        kind,
        inferred,
    )


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
    given = {
        "id_column": id_column,
        "image_columns": image_columns,
        "image_kind": image_kind,
        "table_columns": table_columns,
        "label_columns": label_columns,
        "split_column": split_column,
    }
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
    declared = {str(k): str(v) for k, v in dict(table_types or {}).items()}
    bad = {k: v for k, v in declared.items() if k not in roles.table_columns or v not in ("numeric", "categorical")}
    if bad:
        raise ValueError(
            f"table_types {bad}: keys must be table columns {roles.table_columns} and values 'numeric' or 'categorical'"
        )
    multi_label = len(roles.label_columns) > 1
    rows = df.to_dict(orient="records")
    ids = case_ids([row[roles.id_column] for row in rows], path, roles.id_column)

    label_text: dict[str, str] = {}
    if labels and not multi_label:
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
    elif multi_label:
        classes = list(roles.label_columns)
    else:
        classes = [whole_number_text(clean_cell(c)) for c in class_names or []]

    kind = roles.image_kind
    channels = _CHANNELS[kind]  # type: ignore[index]
    modalities = [ModalitySpec(name, kind, channels) for name in roles.image_columns]  # type: ignore[arg-type]
    if roles.table_columns:
        modalities.append(ModalitySpec(TABLE_MODALITY, "table", 0))
    cases, dropped, absent, empty, split_of = [], [], [], [], {}
    for cid, row in zip(ids, rows):
        paths: dict[str, str | None] = {}
        reasons: dict[str, str] = {}
        for name, col in roles.image_columns.items():
            value = clean_cell(row[col])
            if value is None:
                paths[name], reasons[name] = None, NOT_LISTED
                continue
            full = os.path.expanduser(resolve_path(base_dir, str(value)))  # type: ignore[arg-type]
            if not os.path.exists(full):
                absent.append(f"case {cid} column {col!r}: {full}")
            paths[name] = full
        table = {c: clean_cell(row[c]) for c in roles.table_columns}
        case = Case(cid, "", paths, None, table, reasons)
        if all(p is None for p in paths.values()) and not case.table_present(roles.table_columns):
            empty.append(cid)
            continue
        if labels:
            if multi_label:
                case.label = [binary_label(row[c], cid, c, path) for c in roles.label_columns]
            elif cid not in label_text:
                dropped.append((cid, "label empty"))
                continue
            elif label_text[cid] not in classes:
                raise DataError(
                    f"{path}: case {cid}: label {label_text[cid]!r} in column {roles.label_columns[0]!r}"
                    f" is not one of class_names {classes}"
                )
            else:
                case.label = classes.index(label_text[cid])
        if roles.split_column is not None:
            raw = clean_cell(row[roles.split_column])
            name = normalise_split_name(raw) if raw is not None else None
            if name is None and (labels or raw is not None):
                raise DataError(
                    f"{path}: case {cid}: split {raw!r} in column {roles.split_column!r}; use train, "
                    "valid or test (or set split_column false to make a split)"
                )
            split_of[cid] = name or ""
        cases.append(case)
    # bad input stops the run here, before anything is trained or written: all such cases named at once
    if absent:
        raise DataError(
            f"{path}: {len(absent)} path(s) do not exist, e.g. {absent[0]}; fix them (relative paths "
            f"are read from {base_dir}) or empty the cell to mark the modality missing"
        )
    if empty:
        raise DataError(
            f"{path}: {len(empty)} case(s) have no modality at all (every image and clinical cell "
            f"empty), e.g. {empty[:3]}; fill one or remove the row"
        )

    if roles.split_column is not None:
        split = split_of
    elif not labels:
        split = {c.case_id: "" for c in cases}
    else:
        kept_ids = [c.case_id for c in cases]
        keys = ["".join(map(str, c.label)) if multi_label else str(c.label) for c in cases]  # type: ignore[arg-type]
        fingerprint = case_fingerprint(MANIFEST_NAME, [m.name for m in modalities], kept_ids)
        split = load_or_make_split(kept_ids, keys, split_file, split_fractions, split_seed, fingerprint, MANIFEST_NAME)
    for c in cases:
        c.split = split[c.case_id]
    return CaseList(
        name=MANIFEST_NAME,
        modalities=modalities,
        class_names=classes,
        multi_label=multi_label,
        table_columns=list(roles.table_columns),
        cases=cases,
        dropped=dropped,
        table_types=declared,
        split_made=bool(roles.split_column is None and labels),
    )
