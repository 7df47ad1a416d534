"""ODIR-5K adapter: left + right fundus photographs + age/sex, 8 patient-level labels (multi-label).

Native layout (read unchanged)::

    <dataset_dir>/
      ODIR-5K_Training_Annotations(Updated)_V2.xlsx   sheet Sheet1: ID, Patient Age, Patient Sex,
                                                      Left-Fundus, Right-Fundus, Left-/Right-Diagnostic
                                                      Keywords, N, D, G, C, A, H, M, O
      ODIR-5K_Training_Dataset/ (official) or Training Images/ (Kaggle): {ID}_left.jpg, {ID}_right.jpg

The diagnostic keywords are written from the diagnosis, so they are never used as features. There is
no official split: a seeded, label-stratified, patient-level split is made and saved (``split_file``).
"""

from __future__ import annotations

import os
from typing import Sequence

from cmml_monai.data.adapters.common import (
    FILE_ABSENT,
    NOT_LISTED,
    binary_label,
    case_ids,
    clean_cell,
    drop_all_missing,
    resolve_path,
)
from cmml_monai.data.adapters.splits import DEFAULT_FRACTIONS, load_or_make_split
from cmml_monai.data.cases import TABLE_MODALITY, Case, CaseList, ModalitySpec
from cmml_monai.data.errors import DataError
from cmml_monai.data.fingerprint import case_fingerprint
from cmml_monai.data.table import read_table
from cmml_monai.utils import as_bool

__all__ = [
    "load_odir",
    "ODIR_LABELS",
    "ODIR_COLUMNS",
    "ODIR_ANNOTATION_FILE",
    "ODIR_IMAGE_DIRS",
    "ODIR_TABLE_COLUMNS",
]

ODIR_LABELS = ["N", "D", "G", "C", "A", "H", "M", "O"]
ODIR_ANNOTATION_FILE = "ODIR-5K_Training_Annotations(Updated)_V2.xlsx"
ODIR_IMAGE_DIRS = ("ODIR-5K_Training_Dataset", "Training Images")
ODIR_TABLE_COLUMNS = ["Patient Age", "Patient Sex"]
#: the annotation sheet's columns the adapter reads (the synthetic generator writes the same)
ODIR_COLUMNS = [
    "ID",
    "Patient Age",
    "Patient Sex",
    "Left-Fundus",
    "Right-Fundus",
    "Left-Diagnostic Keywords",
    "Right-Diagnostic Keywords",
    *ODIR_LABELS,
]


def load_odir(
    dataset_dir: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    annotation_file: str = ODIR_ANNOTATION_FILE,
    sheet: str = "Sheet1",
    split_file: str | os.PathLike | None = None,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    split_seed: int = 0,
    use_table: bool = True,
    labels: bool = True,
) -> CaseList:
    """Read ODIR-5K in its native layout.

    Args:
        dataset_dir: folder holding the annotation xlsx and the image folder.
        image_dir: image folder (absolute or relative to ``dataset_dir``); default: the first of
            ``ODIR-5K_Training_Dataset/`` and ``Training Images/`` that exists.
        annotation_file: xlsx name (absolute or relative to ``dataset_dir``).
        sheet: sheet name in the xlsx.
        split_file: JSON file for the split (reused if it exists, written if not); None computes the
            seeded split without saving it. Put it beside the outputs: ``dataset_dir`` may be read-only.
        split_fractions: train, valid, test fractions.
        split_seed: seed of the split.
        use_table: include the table modality (age, sex).
        labels: read the label columns. False (inference of new cases): ``N ... O`` and the keyword columns
            may be absent, every case's label is None and no split is made (split ``""``).

    Raises:
        DataError: missing folder/xlsx/sheet/column, a label other than 0/1, duplicated IDs, bad split file.

    Example:
        >>> cases = load_odir("/data/ODIR-5K", split_file="outputs/odir_split.json")  # doctest: +SKIP
    """
    dataset_dir = os.fspath(dataset_dir)
    labels = as_bool(labels, "labels")  # may come from the command line as text
    if not os.path.isdir(dataset_dir):
        raise DataError(f"ODIR-5K: dataset_dir {dataset_dir} does not exist")
    xlsx = resolve_path(dataset_dir, annotation_file)
    if not os.path.isfile(xlsx):  # type: ignore[arg-type]
        raise DataError(
            f"ODIR-5K: {xlsx} not found; dataset_dir must hold {ODIR_ANNOTATION_FILE} (or set annotation_file)"
        )
    img_root = _image_root(dataset_dir, image_dir)
    required = ODIR_COLUMNS if labels else [c for c in ODIR_COLUMNS if c not in ODIR_LABELS and "Keywords" not in c]
    df = read_table(xlsx, sheet=sheet, required=required)  # type: ignore[arg-type]
    ids = case_ids(df["ID"], xlsx, "ID")  # type: ignore[arg-type]

    columns = list(ODIR_TABLE_COLUMNS) if use_table else []
    modalities = [ModalitySpec("left", "image2d", 3), ModalitySpec("right", "image2d", 3)]
    if columns:
        modalities.append(ModalitySpec(TABLE_MODALITY, "table", 0))
    cases = []
    for cid, row in zip(ids, df.to_dict(orient="records")):
        label = [binary_label(row[c], cid, c, xlsx) for c in ODIR_LABELS] if labels else None  # type: ignore[arg-type]
        paths, reasons = _fundus_paths(row, img_root)
        table = {c: clean_cell(row[c]) for c in columns}
        cases.append(Case(cid, "", paths, label, table, reasons))

    kept, dropped = drop_all_missing(cases, modalities, columns)
    if labels:  # new cases (labels=False) need no split
        keys = ["".join(map(str, c.label)) for c in kept]  # type: ignore[arg-type]
        ids = [c.case_id for c in kept]
        fingerprint = case_fingerprint("odir", [m.name for m in modalities], ids)
        split = load_or_make_split(ids, keys, split_file, split_fractions, split_seed, fingerprint, "odir")
        for c in kept:
            c.split = split[c.case_id]
    return CaseList(
        name="odir",
        modalities=modalities,
        class_names=list(ODIR_LABELS),
        multi_label=True,
        table_columns=columns,
        cases=kept,
        dropped=dropped,
        table_types={"Patient Age": "numeric", "Patient Sex": "categorical"} if columns else {},
        split_made=bool(labels),
    )


def _image_root(dataset_dir: str, image_dir: str | os.PathLike | None) -> str:
    """The folder of the fundus images: ``image_dir``, else the first of the native folder names present."""
    if image_dir is not None:
        img_root = resolve_path(dataset_dir, image_dir)
        if not os.path.isdir(img_root):  # type: ignore[arg-type]
            raise DataError(f"ODIR-5K: image_dir {img_root} does not exist")
        return img_root  # type: ignore[return-value]
    found = [os.path.join(dataset_dir, d) for d in ODIR_IMAGE_DIRS if os.path.isdir(os.path.join(dataset_dir, d))]
    if not found:
        raise DataError(
            f"ODIR-5K: no image folder in {dataset_dir}; expected one of {list(ODIR_IMAGE_DIRS)} or set image_dir"
        )
    return found[0]


def _fundus_paths(row: dict, img_root: str) -> tuple[dict[str, str | None], dict[str, str]]:
    """(eye -> image path or None, eye -> why it is missing) of one workbook row."""
    paths: dict[str, str | None] = {}
    reasons: dict[str, str] = {}
    for name, col in (("left", "Left-Fundus"), ("right", "Right-Fundus")):
        fname = clean_cell(row[col])
        if fname is None:
            paths[name], reasons[name] = None, NOT_LISTED
            continue
        full = os.path.join(img_root, str(fname))
        if os.path.isfile(full):
            paths[name] = full
        else:
            paths[name], reasons[name] = None, FILE_ABSENT
    return paths, reasons
