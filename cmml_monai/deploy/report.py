"""The result of one study as a DICOM Comprehensive SR (highdicom) plus a JSON beside it.

The SR is filed with the source study: it carries the patient and study attributes of the study (highdicom
copies them from the evidence), references every instance of the series used (Current Requested Procedure
Evidence) and each series by its UID, and holds the probability per class, the prediction, the inputs
present and those completed by the model, the model name and version and "research use only". The JSON
holds the same results under the case's id or pseudonym and no patient or study identifier: it may be read
by many people; the SR only by those who may see the study.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import cmml_monai
from cmml_monai.data.errors import DataError
from cmml_monai.data.jsonio import atomic_path, atomic_write_json
from cmml_monai.deploy.description import completes_missing, described_method
from cmml_monai.deploy.inference import MULTI_LABEL_THRESHOLD, probabilities
from cmml_monai.deploy.study import StudyCase

__all__ = [
    "RESEARCH_USE_ONLY",
    "CODING_SCHEME",
    "CaseResult",
    "predict_case",
    "model_identity",
    "TYPE2_ATTRIBUTES",
    "StudyResult",
    "build_sr",
    "write_report",
    "read_sr_result",
]

logger = logging.getLogger(__name__)

RESEARCH_USE_ONLY = "RESEARCH USE ONLY - not for diagnostic use"
#: private coding scheme of the concepts DICOM has no code for (the class names, probabilities, inputs)
CODING_SCHEME = "99CMML"
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "CMML result - research use only"
#: Type 2 attributes the SR copies from the study (present but possibly empty): many exports and synthetic
#: studies lack some; the SR carries those as empty values
TYPE2_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PROBABILITY = "Probability of "


@dataclass
class CaseResult:
    """The network's answer for one case.

    Args:
        case_id: the caller's id or the pseudonym.
        probabilities: class -> probability (softmax, or sigmoid per label).
        prediction: the most probable class (multi-label: the labels at or above 0.5).
        present: the inputs the case has (image modalities, then ``table``).
        completed: the missing inputs the network fills in (CMML, mean imputation; empty for zero fill).
        activation: ``softmax`` or ``sigmoid``.
    """

    case_id: str
    probabilities: dict[str, float]
    prediction: list[str]
    present: list[str]
    completed: list[str]
    activation: str


@dataclass
class StudyResult:
    """What one study gave: the files written and the DICOM objects to send.

    Args:
        case_id: the caller's id or the pseudonym.
        sr_path: the SR file.
        json_path: the JSON file.
        version: 1, or the number of this result when the study was received again with other content.
        dicom_files: every DICOM object to send to the PACS for the study (the SR first); more objects of a
            study (e.g. a Secondary Capture) are appended here.
    """

    case_id: str
    sr_path: str
    json_path: str
    version: int = 1
    dicom_files: list[str] = field(default_factory=list)


@torch.no_grad()
def predict_case(network: torch.nn.Module, description: Mapping[str, Any], case: StudyCase) -> CaseResult:
    """Run the served network on one study's batch; the prediction is computed here from the probabilities
    (argmax, or the threshold per label), not taken from any serving framework.

    Args:
        network: the eager network (:func:`~cmml_monai.deploy.description.load_network`) or its TorchScript
            export (:func:`~cmml_monai.deploy.export.load_torchscript`), called as ``network(image, tabular)``.
        description: the served model's description (classes, modalities, method).
        case: the study's batch (:func:`~cmml_monai.deploy.study.study_case`).

    Example:
        >>> case = study_case(study, desc, "c1")  # doctest: +SKIP
        >>> predict_case(load_network("bundle/models"), desc, case).prediction
        ['high']
    """
    data = description["data"]
    classes = [str(c) for c in data["class_names"]]
    multi = bool(data["multi_label"])
    device = next(network.parameters()).device
    image = case.batch["image"].to(device)
    tabular = case.batch.get("tabular")
    network.eval()
    # a traced TorchScript module takes exactly the inputs it was traced with: no None for a missing table
    logits = (network(image) if tabular is None else network(image, tabular.to(device))).float()
    probs = [float(p) for p in probabilities(logits, multi)[0].cpu()]
    if multi:
        prediction = [c for c, p in zip(classes, probs) if p >= MULTI_LABEL_THRESHOLD]
    else:
        prediction = [classes[max(range(len(probs)), key=probs.__getitem__)]]
    present = list(case.present_images)
    table_name = next((m["name"] for m in data["modalities"] if m["kind"] == "table"), None)
    every = [m for m in case.selection] + ([table_name] if table_name else [])
    if table_name is not None and tabular is not None and not torch.isnan(tabular).all():
        present.append(table_name)
    # a TorchScript module has lost its class: ask its description which method it was built by
    completes = completes_missing(description if isinstance(network, torch.jit.ScriptModule) else network)
    completed = [m for m in every if m not in present] if completes else []
    return CaseResult(
        case.case_id, dict(zip(classes, probs)), prediction, present, completed, "sigmoid" if multi else "softmax"
    )


def model_identity(description: Mapping[str, Any], bundle_dir: str | None = None) -> tuple[str, str]:
    """``(name, version)`` of the served model: the bundle's ``configs/metadata.json`` name and version when
    ``bundle_dir`` (or its parent) has one, else ``cmml-monai <method>`` and the package version; the
    weights' SHA-256 prefix is appended to the version, so two trainings never share one.

    Example:
        >>> model_identity(load_description("bundle/models"), "bundle")  # doctest: +SKIP
        ('CMML missing-modality diagnosis', '0.1.0 (weights 3f2a9c01d4e5)')
    """
    name = f"cmml-monai {described_method(description)}"
    version = cmml_monai.__version__
    folders = [bundle_dir, os.path.dirname(os.path.abspath(bundle_dir))] if bundle_dir else []
    for folder in folders:
        meta = os.path.join(folder, "configs", "metadata.json")
        if os.path.isfile(meta):
            with open(meta, encoding="utf-8") as f:
                data = json.load(f)
            name, version = str(data.get("name", name)), str(data.get("version", version))
            break
    sha = description.get("weights_sha256")
    return name, f"{version} (weights {sha[:12]})" if sha else version


def _code(value: str, meaning: str) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=CODING_SCHEME, meaning=meaning)


def _evidence(case: StudyCase, used: Mapping[str, Any]) -> list[Any]:
    """Headers of every instance of the series used, absent Type 2 attributes set empty (highdicom copies
    them from the first into the SR's patient and study modules)."""
    import pydicom

    evidence = [pydicom.dcmread(f, stop_before_pixels=True) for s in used.values() for f in s.files]
    for ds in evidence:
        for keyword in TYPE2_ATTRIBUTES:
            if keyword not in ds or ds[keyword].value in ("", None) or ds[keyword].VM == 0:
                setattr(ds, keyword, None)
    return evidence


def _algorithm_items(model_name: str, model_version: str) -> list[Any]:
    """The SR's research-use comment and the algorithm's name and version."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    rel = hd.sr.RelationshipTypeValues
    return [
        hd.sr.TextContentItem(codes.DCM.Comment, RESEARCH_USE_ONLY, relationship_type=rel.CONTAINS),
        hd.sr.TextContentItem(
            hd.sr.CodedConcept("111001", "DCM", "Algorithm Name"), model_name, relationship_type=rel.CONTAINS
        ),
        hd.sr.TextContentItem(
            hd.sr.CodedConcept("111003", "DCM", "Algorithm Version"), model_version, relationship_type=rel.CONTAINS
        ),
    ]


def _result_items(result: CaseResult, used: Mapping[str, Any]) -> list[Any]:
    """The SR's findings, probabilities, inputs present (with their series) and inputs the model completed."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    rel = hd.sr.RelationshipTypeValues
    unit = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
    items: list[Any] = []
    # code values are short (SH, 16 characters): the class index; the class name is the meaning
    index = {label: i for i, label in enumerate(result.probabilities)}
    for label in result.prediction:
        items.append(
            hd.sr.CodeContentItem(
                codes.DCM.Finding, _code(f"class-{index[label]}", label), relationship_type=rel.CONTAINS
            )
        )
    for label, p in result.probabilities.items():
        items.append(
            hd.sr.NumContentItem(
                _code(f"prob-{index[label]}", f"{_PROBABILITY}{label}"), p, unit, relationship_type=rel.CONTAINS
            )
        )
    for name in result.present:
        item = hd.sr.TextContentItem(_code("input-present", "Input present"), name, relationship_type=rel.CONTAINS)
        if name in used:
            item.ContentSequence = hd.sr.ContentSequence(
                [
                    hd.sr.UIDRefContentItem(
                        hd.sr.CodedConcept("112002", "DCM", "Series Instance UID"),
                        used[name].uid,
                        relationship_type=rel.HAS_PROPERTIES,
                    )
                ]
            )
        items.append(item)
    for name in result.completed:
        items.append(
            hd.sr.TextContentItem(
                _code("input-completed", "Input completed by model"), name, relationship_type=rel.CONTAINS
            )
        )
    return items


def _page_items(pages: Sequence[Any]) -> list[Any]:
    """The case page's Secondary Captures, referenced as images (the caller lists them as evidence)."""
    import highdicom as hd

    rel = hd.sr.RelationshipTypeValues
    return [
        hd.sr.ImageContentItem(
            _code("case-page", "Case page (research use only)"),
            page.SOPClassUID,
            page.SOPInstanceUID,
            relationship_type=rel.CONTAINS,
        )
        for page in pages
    ]


def build_sr(
    case: StudyCase,
    result: CaseResult,
    model_name: str,
    model_version: str,
    series_number: int = SR_SERIES_NUMBER,
    previous: Sequence[Any] = (),
    pages: Sequence[Any] = (),
) -> Any:
    """The Comprehensive SR of one result, filed with ``case.study``.

    Args:
        previous: earlier SRs of the same study this one replaces (Predecessor Documents Sequence).
        pages: Secondary Captures of the case page (:mod:`cmml_monai.deploy.capture`) the SR references.

    Raises:
        DataError: no series was used (an SR must reference its source images).

    Example:
        >>> sr = build_sr(case, predict_case(net, desc, case), *model_identity(desc))  # doctest: +SKIP
        >>> sr.StudyInstanceUID == case.study.uid
        True
    """
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.uid import generate_uid

    used = {m: s for m, s in case.selection.items() if s is not None}
    if not used:
        raise DataError(
            f"{case.case_id}: no series matches any of the model's sequences; the SR must reference "
            "the images it was computed from: check the series rules (--rules) or the study"
        )
    # headers only: the evidence lists each instance of the series used and gives the patient/study module
    evidence = _evidence(case, used)
    items = [*_algorithm_items(model_name, model_version), *_result_items(result, used), *_page_items(pages)]
    evidence += list(pages)
    root = hd.sr.ContainerContentItem(_code("cmml-report", "CMML multimodal diagnosis (research use only)"))
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=root,
        series_instance_uid=generate_uid(),
        series_number=int(series_number),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="cmml-monai",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        content_qualification="RESEARCH",
        manufacturer_model_name=model_name[:64],
        software_versions=model_version[:64],
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=CODING_SCHEME, name="cmml-monai result concepts", responsible_organization="cmml-monai"
            )
        ],
        previous_versions=list(previous) or None,
    )


def result_stem(case_id: str, version: int = 1) -> str:
    """The file name stem of a study's results: the case id, and ``.vN`` from its second version on.

    Example:
        >>> result_stem("c1"), result_stem("c1", 2)
        ('c1', 'c1.v2')
    """
    return case_id + ("" if int(version) == 1 else f".v{int(version)}")


def write_report(
    case: StudyCase,
    result: CaseResult,
    out_dir: str,
    model_name: str,
    model_version: str,
    series_number: int = SR_SERIES_NUMBER,
    version: int = 1,
    previous: Sequence[Any] = (),
    pages: Sequence[Any] = (),
) -> tuple[str, str]:
    """Write ``<out_dir>/<case>.sr.dcm`` (the SR) and ``<out_dir>/<case>.json``; returns both paths.

    The JSON names the case by ``result.case_id`` and the series by number and description only. A later
    ``version`` of a study (received again with other content) is written as ``<case>.v<version>.sr.dcm`` /
    ``.json``, its SR naming the ``previous`` SRs it replaces; nothing earlier is overwritten.

    Example:
        >>> write_report(case, result, "out", *model_identity(desc))  # doctest: +SKIP
        ('out/case-001.sr.dcm', 'out/case-001.json')
    """
    if int(version) < 1:
        raise ValueError(f"version must be >= 1, got {version!r}")
    sr = build_sr(case, result, model_name, model_version, series_number, previous, pages)
    os.makedirs(out_dir, exist_ok=True)  # only once there is something to write: no empty --out on error
    stem = os.path.join(out_dir, result_stem(result.case_id, version))
    sr_path, json_path = stem + ".sr.dcm", stem + ".json"
    with atomic_path(sr_path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    record = {
        "case_id": result.case_id,
        "research_use_only": True,
        "model": {"name": model_name, "version": model_version},
        "probabilities": result.probabilities,
        "prediction": result.prediction,
        "activation": result.activation,
        "present": result.present,
        "completed": result.completed,
        "series": {
            m: (None if s is None else {"number": s.number, "description": s.description, "files": len(s.files)})
            for m, s in case.selection.items()
        },
        "sr_file": os.path.basename(sr_path),
        "sr_sop_instance_uid": str(sr.SOPInstanceUID),
        "version": int(version),
        "replaces": [str(p.SOPInstanceUID) for p in previous],
    }
    atomic_write_json(json_path, record, indent=2)
    logger.info(
        "%s: %s (%s); SR %s",
        result.case_id,
        ", ".join(result.prediction) or "no label",
        ", ".join(f"{k} {v:.3f}" for k, v in result.probabilities.items()),
        sr_path,
    )
    return sr_path, json_path


def read_sr_result(sr: Any) -> dict[str, Any]:
    """The results held by an SR written by :func:`build_sr` (a pydicom Dataset or a path): prediction,
    probabilities, present (input -> series UID or None), completed, model name and version, comment.

    Example:
        >>> read_sr_result("out/case-001.sr.dcm")["prediction"]  # doctest: +SKIP
        ['high']
    """
    import pydicom

    ds = pydicom.dcmread(sr) if isinstance(sr, (str, os.PathLike)) else sr
    out: dict[str, Any] = {"prediction": [], "probabilities": {}, "present": {}, "completed": []}
    for item in ds.ContentSequence:
        name = item.ConceptNameCodeSequence[0]
        kind = item.ValueType
        if kind == "TEXT" and name.CodeValue == "111001":
            out["model_name"] = item.TextValue
        elif kind == "TEXT" and name.CodeValue == "111003":
            out["model_version"] = item.TextValue
        elif kind == "TEXT" and name.CodeValue == "121106":
            out["comment"] = item.TextValue
        elif kind == "CODE":
            out["prediction"].append(item.ConceptCodeSequence[0].CodeMeaning)
        elif kind == "NUM":
            label = name.CodeMeaning[len(_PROBABILITY) :]
            out["probabilities"][label] = float(item.MeasuredValueSequence[0].NumericValue)
        elif kind == "TEXT" and name.CodeValue == "input-present":
            children = item.get("ContentSequence", [])
            out["present"][item.TextValue] = str(children[0].UID) if children else None
        elif kind == "TEXT" and name.CodeValue == "input-completed":
            out["completed"].append(item.TextValue)
    return out
