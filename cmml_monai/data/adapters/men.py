"""MEN (meningioma grading) adapter: 3D MRI sequences + clinical table, binary low/high grade.

Native layout (read unchanged)::

    <dataset_dir>/
      clinical.csv (or .xlsx; any name, or the clinical_table option)
      <case>/<case>-t1c.nii.gz, <case>-t2w.nii.gz, ...   one NIfTI per sequence (BraTS naming; .nii too)
      <case>/t1c/*.dcm, <case>/t2w/*.dcm, ...             or one DICOM series folder per sequence

The table columns are mapped by ``column_map`` (logical name -> actual column). Grade 1 is low, 2 and 3
are high (``"low"``/``"high"`` and roman numerals are accepted). Each sequence is one image3d modality
with one channel; missing sequences are common and are reported as ``file absent``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import pandas as pd

from cmml_monai.data.adapters.common import (
    FILE_ABSENT,
    case_ids,
    clean_cell,
    drop_all_missing,
    is_dicom_folder,
    resolve_path,
    single_table,
    whole_number_text,
)
from cmml_monai.data.adapters.splits import DEFAULT_FRACTIONS, load_or_make_split, normalise_split_name
from cmml_monai.data.cases import TABLE_MODALITY, Case, CaseList, ModalitySpec
from cmml_monai.data.errors import DataError
from cmml_monai.data.fingerprint import case_fingerprint
from cmml_monai.data.table import read_table
from cmml_monai.utils import as_bool

__all__ = [
    "load_men",
    "MEN_CLASSES",
    "MEN_SEQUENCES",
    "MEN_DEFAULT_COLUMN_MAP",
    "MEN_DEFAULT_TABLE_COLUMNS",
    "parse_grade",
    "find_sequence",
]

MEN_CLASSES = ["low", "high"]
MEN_SEQUENCES = ["t1c", "t1n", "t2w", "t2f"]
MEN_DEFAULT_COLUMN_MAP = {"case_id": "case_id", "grade": "grade", "age": "age", "sex": "sex", "split": "split"}
MEN_DEFAULT_TABLE_COLUMNS = ["age", "sex"]
_GRADES = {"1": 0, "i": 0, "low": 0, "low grade": 0, "2": 1, "3": 1, "ii": 1, "iii": 1, "high": 1, "high grade": 1}
_NUMERIC = {"age"}


def parse_grade(value: object) -> int | None:
    """WHO grade -> 0 (low: grade 1) or 1 (high: grades 2, 3); None when not recognised."""
    v = clean_cell(value)
    if v is None:
        return None
    key = " ".join(str(v).strip().lower().replace("grade", " ").split()) or str(v).strip().lower()
    return _GRADES.get(whole_number_text(key))


def find_sequence(case_dir: str, case_id: str, sequence: str) -> str | None:
    """The NIfTI file or DICOM series folder of ``sequence`` in ``case_dir``; None when absent.

    Tried in order: ``<case>-<seq>.nii.gz``, ``<case>-<seq>.nii``, ``<seq>.nii(.gz)``, then a DICOM folder
    named ``<seq>`` (any case); NIfTI wins when both exist.
    """
    if not os.path.isdir(case_dir):
        return None
    folder = os.path.basename(os.path.normpath(case_dir))
    for stem in (f"{case_id}-{sequence}", f"{folder}-{sequence}", f"{case_id}_{sequence}", sequence):
        for ext in (".nii.gz", ".nii"):
            p = os.path.join(case_dir, stem + ext)
            if os.path.isfile(p):
                return p
    for name in sorted(os.listdir(case_dir)):
        p = os.path.join(case_dir, name)
        if name.lower() == sequence.lower() and is_dicom_folder(p):
            return p
    return None


def load_men(
    dataset_dir: str | os.PathLike,
    clinical_table: str | os.PathLike | None = None,
    sheet: str | int | None = None,
    column_map: Mapping[str, str] | None = None,
    sequences: Sequence[str] = MEN_SEQUENCES,
    table_columns: Sequence[str] | None = None,
    split_file: str | os.PathLike | None = None,
    split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    split_seed: int = 0,
    labels: bool = True,
) -> CaseList:
    """Read a MEN-style dataset (case folders of NIfTI files or DICOM series + clinical table).

    Args:
        dataset_dir: folder holding the case folders (and by default the clinical table).
        clinical_table: CSV/XLSX path (absolute or relative to ``dataset_dir``); default the single table
            file at the top of ``dataset_dir``.
        sheet: sheet of an Excel table (default the first).
        column_map: logical name -> actual column, merged over ``{case_id, grade, age, sex, split}``
            (each mapping to itself). Extra logical names (e.g. ``"kps": "KPS score"``) can be used in
            ``table_columns``.
        sequences: sequence names, one image3d modality each, in packing order.
        table_columns: logical table features (default ``age, sex``); ``[]`` for no table modality.
        split_file: JSON split used when the table has no split column (reused, or written when given).
        split_fractions: train, valid, test fractions for the made split.
        split_seed: seed of the made split.
        labels: read the grade. False (inference of new cases): the grade column may be absent, every case's
            label is None and, without a split column, no split is made (split ``""``).

    Raises:
        DataError: missing folder/table/column, unknown grade or split value, duplicated case ids.

    Example:
        >>> cases = load_men("/data/MEN", column_map={"case_id": "BraTS ID", "grade": "WHO grade"})  # doctest: +SKIP
    """
    dataset_dir = os.fspath(dataset_dir)
    labels = as_bool(labels, "labels")  # may come from the command line as text
    if not os.path.isdir(dataset_dir):
        raise DataError(f"MEN: dataset_dir {dataset_dir} does not exist")
    sequences = [str(s) for s in sequences]
    if not sequences or len(set(sequences)) != len(sequences):
        raise ValueError(f"sequences must be non-empty and unique, got {sequences!r}")
    cmap = dict(MEN_DEFAULT_COLUMN_MAP)
    cmap.update(column_map or {})
    feats = list(MEN_DEFAULT_TABLE_COLUMNS if table_columns is None else table_columns)
    table_path, df = _clinical_table(dataset_dir, clinical_table, sheet, cmap, feats, labels)
    rows = df.to_dict(orient="records")
    ids = case_ids([row[cmap["case_id"]] for row in rows], table_path, cmap["case_id"])
    case_dirs = _case_folders(dataset_dir, ids, table_path)
    modalities = [ModalitySpec(s, "image3d", 1) for s in sequences]
    modalities += [ModalitySpec(TABLE_MODALITY, "table", 0)] if feats else []
    split_col = cmap.get("split")
    has_split = split_col is not None and split_col in df.columns
    read = _MenRows(dataset_dir, table_path, cmap, sequences, feats, labels, split_col if has_split else None)
    for cid, row in zip(ids, rows):
        read.add(cid, row)
    dropped = read.dropped + [
        (d, "not in clinical table") for d in sorted(case_dirs - set(ids)) if not d.startswith(".")
    ]
    kept, empty = drop_all_missing(read.cases, modalities, feats)
    split = read.split_of if has_split else {c.case_id: "" for c in kept}
    if labels and not has_split:
        split = _made_split(kept, [m.name for m in modalities], split_file, split_fractions, split_seed)
    for c in kept:
        c.split = split[c.case_id]
    return CaseList(
        name="men",
        modalities=modalities,
        class_names=list(MEN_CLASSES),
        multi_label=False,
        table_columns=feats,
        cases=kept,
        dropped=dropped + empty,
        table_types={f: ("numeric" if f in _NUMERIC else "categorical") for f in feats if f in ("age", "sex")},
        split_made=bool(not has_split and labels),
    )


def _clinical_table(
    dataset_dir: str,
    clinical_table: str | os.PathLike | None,
    sheet: str | int | None,
    cmap: Mapping[str, str],
    feats: Sequence[str],
    labels: bool,
) -> tuple[str, pd.DataFrame]:
    """(its path, the clinical table) with the id, grade (when labels are read) and feature columns checked."""
    if clinical_table is not None:
        table_path = resolve_path(dataset_dir, clinical_table)
    else:
        table_path = single_table(dataset_dir, "MEN")
    required = [cmap["case_id"], *([cmap["grade"]] if labels else []), *(cmap.get(f, f) for f in feats)]
    return str(table_path), read_table(table_path, sheet=sheet, required=required)  # type: ignore[arg-type]


def _case_folders(dataset_dir: str, ids: Sequence[str], table_path: str) -> set[str]:
    """The folders in ``dataset_dir``; refused when none is named by a case id of the table."""
    case_dirs = {d for d in os.listdir(dataset_dir) if os.path.isdir(os.path.join(dataset_dir, d))}
    if not case_dirs & set(ids):
        raise DataError(
            f"MEN: none of the {len(ids)} case ids in {table_path} has a folder in {dataset_dir}; "
            "expected one folder per case named by its id (check column_map['case_id'])"
        )
    return case_dirs


class _MenRows:
    """The clinical table's rows read into cases (with their sequence files); dropped rows kept with a reason."""

    def __init__(
        self,
        dataset_dir: str,
        table_path: str,
        cmap: Mapping[str, str],
        sequences: Sequence[str],
        feats: Sequence[str],
        labels: bool,
        split_col: str | None,
    ) -> None:
        self.dataset_dir, self.table_path, self.cmap = dataset_dir, table_path, cmap
        self.sequences, self.feats, self.labels, self.split_col = sequences, feats, labels, split_col
        self.cases: list[Case] = []
        self.dropped: list[tuple[str, str]] = []
        self.split_of: dict[str, str] = {}

    def _label(self, cid: str, row: Mapping[str, Any]) -> tuple[bool, int | None]:
        """(keep the case, its label); a grade that is not a grade is refused."""
        if not self.labels:
            return True, None
        grade_col = self.cmap["grade"]
        grade_raw = clean_cell(row[grade_col])
        if grade_raw is None:
            self.dropped.append((cid, "grade empty"))
            return False, None
        label = parse_grade(grade_raw)
        if label is None:
            raise DataError(
                f"{self.table_path}: case {cid}: grade {grade_raw!r} in column {grade_col!r} is not 1, 2, 3, "
                "low or high"
            )
        return True, label

    def _paths(self, cid: str) -> tuple[dict[str, str | None], dict[str, str]]:
        case_dir = os.path.join(self.dataset_dir, cid)
        paths: dict[str, str | None] = {}
        reasons: dict[str, str] = {}
        for s in self.sequences:
            p = find_sequence(case_dir, cid, s)
            paths[s] = p
            if p is None:
                reasons[s] = FILE_ABSENT if os.path.isdir(case_dir) else "case folder absent"
        return paths, reasons

    def add(self, cid: str, row: Mapping[str, Any]) -> None:
        """Read one row into a case, or drop it (empty grade)."""
        keep, label = self._label(cid, row)
        if not keep:
            return
        if self.split_col is not None:
            name = normalise_split_name(clean_cell(row[self.split_col]))
            if name is None:
                raise DataError(
                    f"{self.table_path}: case {cid}: split {row[self.split_col]!r} in column {self.split_col!r}; "
                    "use train, valid or test"
                )
            self.split_of[cid] = name
        paths, reasons = self._paths(cid)
        table = {f: clean_cell(row[self.cmap.get(f, f)]) for f in self.feats}
        self.cases.append(Case(cid, "", paths, label, table, reasons))


def _made_split(
    kept: Sequence[Case],
    modality_names: list[str],
    split_file: str | os.PathLike | None,
    split_fractions: Sequence[float],
    split_seed: int,
) -> dict[str, str]:
    """The seeded, grade-stratified split of the kept cases (reused from ``split_file`` when it matches)."""
    ids = [c.case_id for c in kept]
    fingerprint = case_fingerprint("men", modality_names, ids)
    return load_or_make_split(
        ids, [str(c.label) for c in kept], split_file, split_fractions, split_seed, fingerprint, "men"
    )
