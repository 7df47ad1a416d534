"""The case page in the PACS: a DICOM Secondary Capture (highdicom) filed in the study, beside the SR.

A viewer displays images, not SRs: the page (:mod:`cmml_monai.evaluation.casepage`: the series used with
their saliency maps, the clinical values given, the probabilities, the completed inputs, "RESEARCH USE ONLY"
drawn into the pixels) becomes an RGB Secondary Capture in the study's StudyInstanceUID, in its own series.
Its patient and study attributes are copied from one instance of the study (:data:`STUDY_KEYWORDS`: patient
name, id, birth date and sex, study UID, date, time, id, accession number, referring physician; through
highdicom's ``SCImage.from_ref_dataset``); nothing else of the source header (no institution, station or
staff). The PNG beside it carries no patient attribute: the page names the case by its pseudonym.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from cmml_monai.data.jsonio import atomic_path
from cmml_monai.deploy.inference import PAGES_INDEX_NAME, case_explainer
from cmml_monai.deploy.report import RESEARCH_USE_ONLY, TYPE2_ATTRIBUTES, result_stem
from cmml_monai.deploy.study import StudyCase
from cmml_monai.evaluation.casepage import save_page, write_index

__all__ = [
    "SC_SERIES_NUMBER",
    "SC_SERIES_DESCRIPTION",
    "STUDY_KEYWORDS",
    "study_attributes",
    "build_capture",
    "StudyExplainer",
    "update_index",
]

logger = logging.getLogger(__name__)

SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "CMML case page - research use only"


#: what the SC takes from the study: its patient and general study modules, nothing of the equipment or staff
STUDY_KEYWORDS = ("SpecificCharacterSet", "StudyInstanceUID", *TYPE2_ATTRIBUTES)


def study_attributes(ds: Any) -> Any:
    """A dataset holding only ``ds``'s :data:`STUDY_KEYWORDS` (highdicom's ``from_ref_dataset`` would copy the
    acquisition equipment - institution, station - of a full header too).

    Example:
        >>> sorted(e.keyword for e in study_attributes(pydicom.dcmread(path)))  # doctest: +SKIP
        ['AccessionNumber', 'PatientBirthDate', 'PatientID', 'PatientName', ...]
    """
    from pydicom import Dataset

    out = Dataset()
    for keyword in STUDY_KEYWORDS:
        if keyword in ds:
            setattr(out, keyword, ds.data_element(keyword).value)
    return out


def build_capture(
    page: np.ndarray, ref_dataset: Any, model_name: str, model_version: str, series_number: int = SC_SERIES_NUMBER
) -> Any:
    """The RGB Secondary Capture of ``page`` (``[H, W, 3]`` uint8), in the study of ``ref_dataset``.

    Raises:
        ValueError: ``page`` is not an ``[H, W, 3]`` uint8 array.

    Example:
        >>> sc = build_capture(read_page("out/c1.png"), pydicom.dcmread(series_file), "cmml", "0.1.0")  # doctest: +SKIP
        >>> sc.StudyInstanceUID == pydicom.dcmread(series_file).StudyInstanceUID  # doctest: +SKIP
        True
    """
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if page.ndim != 3 or page.shape[2] != 3 or page.dtype != np.uint8:
        raise ValueError(f"page must be an [H, W, 3] uint8 array, got {page.dtype} {tuple(page.shape)}")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=study_attributes(ref_dataset),
        pixel_array=page,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="cmml-monai",
        # highdicom asks an orientation of a PATIENT image; a page has none, so it is emptied below (type 2)
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SC_SERIES_DESCRIPTION,
        manufacturer_model_name=model_name[:64],
        software_versions=model_version[:64],
    )
    sc.PatientOrientation = None  # type: ignore[assignment]  # Type 2C, empty: pydicom writes a zero-length value
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = RESEARCH_USE_ONLY  # plain ASCII: the default character set has no dash
    return sc


def update_index(out_dir: str) -> str:
    """``<out_dir>/index.html``: every case of ``out_dir`` with a page (``<case>.png``) and a result JSON.

    Example:
        >>> update_index("results")  # doctest: +SKIP
        'results/index.html'
    """
    import json

    entries = []
    for name in sorted(os.listdir(out_dir)):
        stem = name[: -len(".png")]
        record_path = os.path.join(out_dir, stem + ".json")
        if not name.endswith(".png") or not os.path.isfile(record_path):
            continue
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        entries.append(
            {
                "case_id": record.get("case_id", stem),
                "prediction": record.get("prediction", []),
                "present": record.get("present", []),
                "completed": record.get("completed", []),
                "page": name,
            }
        )
    return write_index(entries, os.path.join(out_dir, PAGES_INDEX_NAME), title="CMML case pages")


class StudyExplainer:
    """The served network's page for each study: ``<out_dir>/<case>.png`` and ``<case>.sc.dcm``.

    Args:
        network: the served network (eager: Grad-CAM; TorchScript: occlusion).
        description: its description (modalities, classes, preprocessing).

    Example:
        >>> ex = StudyExplainer(load_network("bundle"), load_description("bundle"))  # doctest: +SKIP
        >>> png, sc_path, sc = ex.write(case, "results", "cmml", "0.1.0")  # doctest: +SKIP
    """

    def __init__(self, network: torch.nn.Module, description: Mapping[str, Any]) -> None:
        self.description = description
        self.explainer = case_explainer(network, description)
        prep = description.get("preprocessing") or {}
        self.mean, self.std = prep.get("mean"), prep.get("std")

    def write(
        self,
        case: StudyCase,
        out_dir: str,
        model_name: str,
        model_version: str,
        series_number: int = SC_SERIES_NUMBER,
        version: int = 1,
    ) -> tuple[str, str, Any]:
        """Explain ``case``, write its PNG page and its Secondary Capture, named as the SR of that ``version``
        (:func:`~cmml_monai.deploy.report.result_stem`); returns both paths and the SC.

        Raises:
            ValueError: the case uses no series (the SC takes the study's attributes from one of them).
        """
        import pydicom

        used = [s for s in case.selection.values() if s is not None]
        if not used:
            raise ValueError(f"{case.case_id}: no series was used; the page's SC needs one instance of the study")
        os.makedirs(out_dir, exist_ok=True)
        table = case.clinical if self.explainer.table_name is not None else None
        explanation = self.explainer(case.batch["image"], case.batch.get("tabular"), case.case_id, table)
        stem = os.path.join(out_dir, result_stem(case.case_id, version))
        png = stem + ".png"
        page = save_page(explanation, png, self.mean, self.std)
        ref = pydicom.dcmread(used[0].files[0], stop_before_pixels=True)
        sc = build_capture(page, ref, model_name, model_version, series_number)
        sc_path = stem + ".sc.dcm"
        with atomic_path(sc_path) as tmp:
            sc.save_as(tmp, enforce_file_format=True)
        logger.info("%s: case page (%s maps) %s; SC %s", case.case_id, explanation.method, png, sc_path)
        return png, sc_path, sc
