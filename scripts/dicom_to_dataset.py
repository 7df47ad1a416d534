#!/usr/bin/env python
"""Turn a folder of exported DICOM studies plus a clinical sheet into the MEN layout, with pseudonymised ids.

Usage:
    CMML_PSEUDONYM_KEY=... python scripts/dicom_to_dataset.py /exports/pacs --clinical sheet.xlsx \\
        --id-column patient_id --id-attribute PatientID --out /data/men_local

Each study becomes one case ``<out>/<case>/<case>-<sequence>.nii.gz`` (one NIfTI per sequence, picked by the
series rules of ``python -m cmml_monai.deploy``; ``--rules FILE`` to change them), ``<out>/clinical.csv`` holds
the sheet's row of each case under ``case_id`` (the sheet's id column dropped; ``age``/``sex`` taken from the
DICOM header when the sheet lacks them), and ``<out>/conversion_report.json`` lists per case the sequences
found and missing (and why), and how many studies lacked each sequence. The case id is a keyed hash
(HMAC-SHA256) of the study's ``--id-attribute`` value: the same key maps the same patient/accession to the
same id again (a second study of it gets ``-2``), and without the key the id cannot be traced back; keep the
key with the person allowed to re-identify. The key comes from ``--key`` or the
``CMML_PSEUDONYM_KEY`` environment variable (preferred: a command line is visible to other users). Nothing
is written under ``--out`` until every study is converted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from typing import Any

try:
    import cmml_monai  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from cmml_monai.data.adapters.men import MEN_SEQUENCES  # noqa: E402
from cmml_monai.data.errors import DataError  # noqa: E402
from cmml_monai.data.readers import load_image  # noqa: E402
from cmml_monai.data.table import read_table  # noqa: E402
from cmml_monai.deploy.pipeline import KEY_ENV, load_rules  # noqa: E402
from cmml_monai.deploy.study import (  # noqa: E402
    SeriesRules,
    Study,
    check_series,
    header_clinical_values,
    pseudonym,
    resample_series,
    scan_studies,
)

# JSON, not CSV: the MEN adapter takes the one table at the top of the folder as the clinical table
REPORT_NAME = "conversion_report.json"
CLINICAL_NAME = "clinical.csv"
HEADER_FILLED = ("age", "sex")  # taken from the DICOM header when the sheet has no such column


def series_to_nifti(study_series: Any, dest: str, irregular: str = "refuse") -> bool:
    """Read one series as the training readers do (ITK, geometry checked) and save it as NIfTI (RAS affine).

    Returns True when its slices were unevenly spaced and were resampled (``irregular="resample"``).
    """
    if check_series(study_series, allow_uneven=irregular == "resample"):
        resample_series(study_series, dest)
        return True
    with tempfile.TemporaryDirectory(prefix="cmml-series-") as folder:
        for i, f in enumerate(study_series.files):
            try:
                os.symlink(os.path.abspath(f), os.path.join(folder, f"{i:05d}.dcm"))
            except OSError:
                shutil.copyfile(f, os.path.join(folder, f"{i:05d}.dcm"))
        image = load_image(folder, "image3d", reader="itk")
    volume = np.asarray(image[0], dtype=np.float32)
    affine = np.asarray(image.affine, dtype=np.float64)
    # a NIfTI with only geometry: no header text, so nothing of the DICOM header travels
    nib.save(nib.Nifti1Image(volume, affine), dest)
    return False


def _case_ids(studies: list[Study], id_attribute: str, key: str) -> list[str]:
    """One pseudonym per study; a second study of the same id value gets ``-2`` (by study date, then UID)."""
    order = sorted(range(len(studies)), key=lambda i: (str(studies[i].header.get("StudyDate", "")), studies[i].uid))
    seen: Counter[str] = Counter()
    ids = [""] * len(studies)
    for i in order:
        value = str(studies[i].header.get(id_attribute, "") or "").strip()
        if not value:
            raise DataError(f"a study has no {id_attribute}; choose another --id-attribute (e.g. AccessionNumber)")
        base = pseudonym(value, key)
        seen[base] += 1
        ids[i] = base if seen[base] == 1 else f"{base}-{seen[base]}"
    return ids


def convert(
    export_dir: str,
    clinical: str | None,
    out: str,
    key: str,
    id_column: str = "patient_id",
    id_attribute: str = "PatientID",
    sequences: list[str] | None = None,
    rules: SeriesRules | None = None,
    irregular: str = "refuse",
) -> dict[str, Any]:
    """Convert every study of ``export_dir``; returns the summary of ``conversion_report.json`` (its per-case
    list left out).

    Raises:
        DataError: no study, an existing non-empty ``out``, a sheet without ``id_column``, a study without
            ``id_attribute``.

    Example:
        >>> convert("/exports/pacs", "sheet.csv", "/data/men_local", key="...")["n_cases"]  # doctest: +SKIP
        42
    """
    sequences = list(sequences or MEN_SEQUENCES)
    rules = rules or SeriesRules()
    if os.path.isdir(out) and os.listdir(out):
        raise DataError(f"--out {out} exists and is not empty; choose a new folder")
    studies = scan_studies(export_dir)
    case_ids = _case_ids(studies, id_attribute, key)
    table = None
    if clinical is not None:
        table = read_table(clinical, required=[id_column])
        table[id_column] = table[id_column].map(lambda v: str(v).strip())
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".dicom_to_dataset-", dir=parent)
    try:
        rows, report, matched = [], [], set()
        for study, case in zip(studies, case_ids):
            os.makedirs(os.path.join(work, case))
            selection = rules.select(study, sequences, case)
            present, missing, resampled = [], {}, []
            for seq, series in selection.items():
                if series is None:
                    missing[seq] = "no matching series"
                    continue
                try:
                    if series_to_nifti(series, os.path.join(work, case, f"{case}-{seq}.nii.gz"), irregular):
                        resampled.append(seq)
                    present.append(seq)
                except DataError as e:  # one bad series: that sequence is missing, the study still counts
                    missing[seq] = f"refused: {e}"
            id_value = str(study.header.get(id_attribute, "") or "").strip()
            row: dict[str, Any] = {"case_id": case}
            in_sheet = False
            if table is not None:
                hits = table[table[id_column] == id_value]
                if not hits.empty:
                    in_sheet = True
                    matched.add(id_value)
                    row.update({k: v for k, v in hits.iloc[0].items() if k != id_column})
            fill = [c for c in HEADER_FILLED if table is None or c not in table.columns]
            row.update(header_clinical_values(study.header, fill))
            rows.append(row)
            report.append(
                {
                    "case_id": case,
                    "present": present,
                    "missing": missing,
                    "resampled": resampled,
                    "clinical_row": in_sheet,
                }
            )
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(os.path.join(work, CLINICAL_NAME), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        lacking = Counter(s for r in report for s in r["missing"])
        summary = {
            "n_cases": len(report),
            "sequences": sequences,
            "studies_lacking": {s: lacking.get(s, 0) for s in sequences},
            "cases_without_clinical_row": sum(1 for r in report if not r["clinical_row"]),
            # counts only: the sheet's ids are patient identifiers
            "sheet_rows_without_study": 0 if table is None else int((~table[id_column].isin(matched)).sum()),
            "pseudonym": f"HMAC-SHA256 of {id_attribute}, first 16 hex digits",
        }
        with open(os.path.join(work, REPORT_NAME), "w", encoding="utf-8") as f:
            json.dump({**summary, "cases": report}, f, indent=2)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", help="folder of exported DICOM studies (recursive) or a DICOMDIR")
    parser.add_argument("--out", required=True, help="the new MEN-layout folder (must not exist or be empty)")
    parser.add_argument("--clinical", help="clinical sheet (CSV/XLSX), one row per --id-column value")
    parser.add_argument("--id-column", default="patient_id", help="the sheet's id column (default patient_id)")
    parser.add_argument(
        "--id-attribute",
        default="PatientID",
        help="DICOM keyword matching --id-column and pseudonymised (default PatientID)",
    )
    parser.add_argument(
        "--sequences",
        nargs="+",
        default=list(MEN_SEQUENCES),
        help=f"sequence names, in order (default {' '.join(MEN_SEQUENCES)})",
    )
    parser.add_argument("--rules", help="JSON file of series rules (see docs/pacs.md)")
    parser.add_argument("--key", help=f"pseudonym key (default: the {KEY_ENV} environment variable)")
    parser.add_argument(
        "--irregular",
        choices=["refuse", "resample"],
        default="refuse",
        help="a series whose slices are not evenly spaced: missing (refuse, default) or resampled "
        "to an even gap (listed under 'resampled' in the report)",
    )
    args = parser.parse_args(argv)
    key = args.key or os.environ.get(KEY_ENV)
    try:
        if not key:
            raise DataError(f"no pseudonym key: set {KEY_ENV} (or --key); keep it to map the ids back")
        summary = convert(
            args.export_dir,
            args.clinical,
            args.out,
            key,
            args.id_column,
            args.id_attribute,
            args.sequences,
            load_rules(args.rules),
            args.irregular,
        )
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lacking = ", ".join(f"{s} {n}" for s, n in summary["studies_lacking"].items() if n) or "none"
    print(
        f"{summary['n_cases']} case(s) in {args.out}; studies lacking a sequence: {lacking}; "
        f"without a clinical row: {summary['cases_without_clinical_row']}; "
        f"sheet rows without a study: {summary['sheet_rows_without_study']} (see {REPORT_NAME})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
