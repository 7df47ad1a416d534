"""A DICOM study as one case of the served network, without any SDK.

The study -> case glue (:func:`study_case`); its steps live in the submodules ``scan`` (files into
studies and series), ``select`` (series -> model modality), ``geometry`` (one regular volume per series)
and ``clinical`` (clinical values, pseudonyms). Every public name of them is importable from here.

A study folder (searched recursively), a DICOMDIR, or a folder mixing the files of several studies is read
header-only (pydicom, ``stop_before_pixels``) and grouped by StudyInstanceUID and SeriesInstanceUID. Each
image modality of the served network gets one series by :class:`SeriesRules` (regular expressions on
SeriesDescription, then ProtocolName; localizers and derived series excluded by ImageType), the selected
series are checked (pixel data, one orientation, one pixel spacing, even slice gaps) and read by the same
transforms the network was trained with (:func:`cmml_monai.deploy.inference.inference_dataset`), so the
result is exactly the batch the served network takes, NaN for a missing sequence or clinical value.

Patient identifiers stay in :attr:`Study.header` (used by the DICOM report only); logs and errors name a
case by the caller's id or a pseudonym, and series by number and description.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cmml_monai.data.cases import Case, CaseList, ModalitySpec
from cmml_monai.data.dataset import collate_cases
from cmml_monai.data.errors import DataError
from cmml_monai.deploy.inference import inference_dataset
from cmml_monai.deploy.study.clinical import HEADER_COLUMNS, ClinicalSource, header_clinical_values, pseudonym
from cmml_monai.deploy.study.geometry import MAX_VOXELS, check_series, resample_series
from cmml_monai.deploy.study.scan import SeriesInfo, Study, find_dicom_files, load_study, scan_studies
from cmml_monai.deploy.study.select import (
    DEFAULT_RULES,
    EXCLUDED_DESCRIPTION,
    EXCLUDED_IMAGE_TYPES,
    MODALITY_ALIASES,
    SeriesRules,
)

__all__ = [
    "DEFAULT_RULES",
    "MODALITY_ALIASES",
    "EXCLUDED_IMAGE_TYPES",
    "EXCLUDED_DESCRIPTION",
    "HEADER_COLUMNS",
    "IRREGULAR",
    "SeriesInfo",
    "Study",
    "SeriesRules",
    "ClinicalSource",
    "StudyCase",
    "find_dicom_files",
    "scan_studies",
    "load_study",
    "MAX_VOXELS",
    "check_series",
    "resample_series",
    "pseudonym",
    "header_clinical_values",
    "study_case",
]

logger = logging.getLogger(__name__)

#: what :func:`study_case` does with a series whose slices are not evenly spaced
IRREGULAR = ("refuse", "resample")


@dataclass
class StudyCase:
    """A study turned into one case of the served network.

    Args:
        case_id: the caller's id or the pseudonym (never a patient identifier).
        batch: the network's batch of one case: ``image`` ``[1, C, *spatial]`` (NaN where missing),
            ``tabular`` ``[1, F]`` or absent, ``case_id``.
        selection: model image modality -> the series used (None: missing).
        clinical: the raw clinical values used (None: missing).
        study: the study (its ``header`` carries PHI: for the DICOM report only).
    """

    case_id: str
    batch: dict[str, Any]
    selection: dict[str, SeriesInfo | None]
    clinical: dict[str, Any]
    study: Study

    @property
    def present_images(self) -> list[str]:
        return [m for m, s in self.selection.items() if s is not None]


def _link_series(series: SeriesInfo, folder: str) -> str:
    """A folder holding only ``series``' files (links; copies where links are not allowed), so the
    training readers read it as one DICOM series folder."""
    os.makedirs(folder)
    for i, f in enumerate(series.files):
        dest = os.path.join(folder, f"{i:05d}.dcm")
        try:
            os.symlink(os.path.abspath(f), dest)
        except OSError:
            shutil.copyfile(f, dest)
    return folder


def _image_modalities(data: Mapping[str, Any]) -> tuple[list[ModalitySpec], list[ModalitySpec]]:
    """All modalities of the served network and its image ones; refuses images a DICOM study cannot give."""
    mods = [ModalitySpec(m["name"], m["kind"], int(m["channels"])) for m in data["modalities"]]
    image_mods = [m for m in mods if m.kind != "table"]
    if any(m.kind != "image3d" for m in image_mods):
        raise DataError(
            f"the served model takes {[m.kind for m in image_mods]} images; DICOM studies give "
            "3D volumes (image3d) only"
        )
    return mods, image_mods


def _clinical_values(
    data: Mapping[str, Any], clinical: ClinicalSource, study: Study, case_id: str
) -> tuple[list[str], dict[str, Any]]:
    """The network's table columns and the study's values for them (None where unknown)."""
    columns = [str(c) for c in data.get("table_columns") or []]
    vocab = {
        c["name"]: c.get("vocabulary", [])
        for c in (data.get("table_schema") or {}).get("columns", [])
        if c.get("type") == "categorical"
    }
    values = clinical.values(study.header, case_id, columns, vocab) if columns else {}
    return columns, values


def _series_paths(
    selection: Mapping[str, SeriesInfo | None], uneven: set[str], work: str, case_id: str
) -> dict[str, str | None]:
    """Model modality -> what the training readers read for it under ``work``: a folder of the series'
    files, a resampled NIfTI for an unevenly spaced one, None for a missing one."""
    paths: dict[str, str | None] = {}
    for m, s in selection.items():
        if s is None:
            paths[m] = None
        elif m in uneven:
            paths[m] = dest = os.path.join(work, f"{m}.nii.gz")
            gap = resample_series(s, dest)
            logger.warning(
                "%s: %s has unevenly spaced slices; resampled to an even %.3g mm gap for %s",
                case_id,
                s.label(),
                gap,
                m,
            )
        else:
            paths[m] = _link_series(s, os.path.join(work, m))
    return paths


def study_case(
    study: Study,
    description: Mapping[str, Any],
    case_id: str,
    rules: SeriesRules | None = None,
    clinical: ClinicalSource | None = None,
    work_dir: str | None = None,
    irregular: str = "refuse",
) -> StudyCase:
    """The batch the served network takes for ``study``.

    Args:
        study: from :func:`load_study` / :func:`scan_studies`.
        description: :func:`cmml_monai.deploy.load_description` of the served model (modalities,
            table schema, preprocessing).
        case_id: how logs and outputs name the case (the caller's id or :func:`pseudonym`).
        rules: series selection (default :class:`SeriesRules` ()).
        clinical: where clinical values come from (default the DICOM header).
        work_dir: where the series folders are linked while reading (default a temporary folder, removed).
        irregular: a selected series whose slices are not evenly spaced: ``"refuse"`` (an error) or
            ``"resample"`` (:func:`resample_series`, said in the log).

    Raises:
        DataError: a selected series without pixel data or of irregular geometry, or no modality at all.
        ValueError: ``irregular`` is neither ``"refuse"`` nor ``"resample"``.

    Example:
        >>> desc = load_description("bundle/models")  # doctest: +SKIP
        >>> case = study_case(load_study("/exports/s1"), desc, "case-001")
        >>> case.batch["image"].shape
        torch.Size([1, 4, 96, 96, 96])
    """
    if irregular not in IRREGULAR:
        raise ValueError(f"irregular must be one of {IRREGULAR}, got {irregular!r}")
    rules = rules or SeriesRules()
    clinical = clinical or ClinicalSource()
    data = description["data"]
    mods, image_mods = _image_modalities(data)
    selection = rules.select(study, [m.name for m in image_mods], case_id)
    uneven = {m for m, s in selection.items() if s is not None and check_series(s, irregular == "resample")}
    columns, values = _clinical_values(data, clinical, study, case_id)
    if all(s is None for s in selection.values()) and all(v is None for v in values.values()):
        raise DataError(
            f"{case_id}: no series matches any of {[m.name for m in image_mods]} and no clinical "
            "value is known; check the series rules (--rules)"
        )
    own_dir = work_dir is None
    work = tempfile.mkdtemp(prefix="cmml-study-") if work_dir is None else os.fspath(work_dir)
    try:
        paths = _series_paths(selection, uneven, work, case_id)
        reasons = {m: "no matching series" for m, p in paths.items() if p is None}
        case = Case(case_id, "", paths, None, values, reasons)
        case_list = CaseList(
            data.get("dataset", "study"), mods, list(data["class_names"]), bool(data["multi_label"]), columns, [case]
        )
        batch = collate_cases([inference_dataset(description, case_list)[0]])
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    return StudyCase(case_id, batch, selection, values, study)
