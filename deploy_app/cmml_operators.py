"""The operators of the MONAI Deploy application (``deploy_app/app.py``): thin wrappers around
:mod:`cmml_monai.deploy`, so the application and ``python -m cmml_monai.deploy`` compute the same thing.

Each operator passes plain Python objects downstream (the SDK's ports carry any object)::

    StudyLoaderOperator  --studies-->  SeriesSelectorOperator  --cases-->  TorchScriptInferenceOperator
        --results-->  [CasePageOperator  --results-->]  SRWriterOperator
    (writes <out>/<case>.sr.dcm and <out>/<case>.json; with the case page operator first <out>/<case>.png,
    <out>/<case>.sc.dcm, referenced from the SR, and <out>/index.html)

The SDK's own operators are not used: its DICOMDataLoaderOperator yields the SDK's DICOMStudy objects, not
the files per series that :func:`cmml_monai.deploy.study.study_case` reads; its series selector has no
exclusion rule for localizers and derived series; its MonaiBundleInferenceOperator passes only tensors to
the network (no missing table as NaN through ``None``) and turns probabilities into labels itself, whereas
the prediction here is :func:`cmml_monai.deploy.report.predict_case`'s. No operator logs a header value:
the study's patient attributes go into the SR only.

Needs ``monai-deploy-app-sdk`` (``deploy_app/requirements.txt``) besides ``cmml_monai``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.deploy.core import Fragment, Operator, OperatorSpec

from cmml_monai.data.errors import DataError
from cmml_monai.deploy.capture import SC_SERIES_NUMBER, StudyExplainer, update_index
from cmml_monai.deploy.description import WEIGHTS_NAME, file_sha256, load_network
from cmml_monai.deploy.pipeline import case_name, load_studies
from cmml_monai.deploy.report import SR_SERIES_NUMBER, CaseResult, predict_case, write_report
from cmml_monai.deploy.study import IRREGULAR, ClinicalSource, SeriesRules, StudyCase, study_case

__all__ = [
    "StudyLoaderOperator",
    "SeriesSelectorOperator",
    "TorchScriptInferenceOperator",
    "CasePageOperator",
    "SRWriterOperator",
    "EXPLAIN_CHOICES",
    "explained_network",
]

#: ``CMML_EXPLAIN``'s values that write the case page: Grad-CAM on the rebuilt eager network, or occlusion
#: on the served TorchScript module
EXPLAIN_CHOICES = ("gradcam", "occlusion")

logger = logging.getLogger(__name__)


class StudyLoaderOperator(Operator):
    """Emits the DICOM studies under a folder (``studies``: a list of
    :class:`~cmml_monai.deploy.study.Study`), grouped by StudyInstanceUID and SeriesInstanceUID.

    Args:
        fragment: the application.
        input_folder: the study folder (searched recursively) or a DICOMDIR.
        each_study: emit every study of the folder; without it, a folder of several studies is an error.

    Example:
        >>> loader = StudyLoaderOperator(app, CountCondition(app, 1), input_folder="in",
        ...                              name="loader")  # doctest: +SKIP
    """

    def __init__(
        self, fragment: Fragment, *args: Any, input_folder: str, each_study: bool = False, **kwargs: Any
    ) -> None:
        self.input_folder = os.fspath(input_folder)
        self.each_study = bool(each_study)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("studies")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        studies = load_studies(self.input_folder, self.each_study)
        logger.info("%d study(ies) under the input folder", len(studies))
        op_output.emit(studies, "studies")


class SeriesSelectorOperator(Operator):
    """Turns each study into the served network's batch (``cases``: a list of
    :class:`~cmml_monai.deploy.study.StudyCase`): series picked by :class:`SeriesRules`, clinical values from
    the header or a table, cases named by the keyed hash of the StudyInstanceUID.

    Args:
        fragment: the application.
        description: the served model's description (modalities, preprocessing, table schema).
        rules: series selection (default :class:`SeriesRules` ()).
        clinical: where clinical values come from (default the DICOM header).
        key: pseudonym key; ``None``: each case gets a random id (logged as such).
        irregular: ``"refuse"`` or ``"resample"`` a series with unevenly spaced slices.

    Raises:
        ValueError: ``irregular`` is not one of ``("refuse", "resample")``.

    Example:
        >>> selector = SeriesSelectorOperator(app, description=desc, key="site-key", name="selector")  # doctest: +SKIP
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        description: Mapping[str, Any],
        rules: SeriesRules | None = None,
        clinical: ClinicalSource | None = None,
        key: str | None = None,
        irregular: str = "refuse",
        **kwargs: Any,
    ) -> None:
        if irregular not in IRREGULAR:
            raise ValueError(f"irregular must be one of {IRREGULAR}, got {irregular!r}")
        self.served_description = description
        self.rules = rules or SeriesRules()
        self.clinical = clinical or ClinicalSource()
        self.key = key
        self.irregular = irregular
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("studies")
        spec.output("cases")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        cases = [
            study_case(
                s, self.served_description, case_name(s, self.key), self.rules, self.clinical, irregular=self.irregular
            )
            for s in op_input.receive("studies")
        ]
        op_output.emit(cases, "cases")


class TorchScriptInferenceOperator(Operator):
    """Runs the served TorchScript network on each case (``results``: a list of ``(StudyCase, CaseResult)``);
    the probabilities and the prediction are :func:`~cmml_monai.deploy.report.predict_case`'s.

    Args:
        fragment: the application.
        network: the module of :func:`cmml_monai.deploy.export.load_torchscript`.
        description: its description.

    Example:
        >>> net, desc = load_torchscript("bundle/men_cmml")  # doctest: +SKIP
        >>> infer = TorchScriptInferenceOperator(app, network=net, description=desc, name="inference")
    """

    def __init__(
        self, fragment: Fragment, *args: Any, network: torch.nn.Module, description: Mapping[str, Any], **kwargs: Any
    ) -> None:
        self.network = network
        self.served_description = description
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("cases")
        spec.output("results")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        cases: Sequence[StudyCase] = op_input.receive("cases")
        results = [(case, predict_case(self.network, self.served_description, case)) for case in cases]
        op_output.emit(results, "results")


def explained_network(
    served: torch.nn.Module, description: Mapping[str, Any], method: str, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The network the case page's maps are computed on.

    ``"gradcam"``: the eager network rebuilt from the bundle's ``models/network.json`` and ``models/model.pt``
    beside ``model.ts`` (:func:`~cmml_monai.deploy.description.load_network`, as the CLI and the listener serve
    it): MONAI's Grad-CAM hooks the image encoders' last stage, which a TorchScript module does not expose; one
    forward and one backward pass per case. The weights must be the file ``model.ts`` was exported from (its
    embedded ``weights_sha256``), so the maps explain the network that answered. ``"occlusion"``: the served
    TorchScript module itself, explained as a black box by MONAI's ``OcclusionSensitivity`` (no weights
    needed; many forward passes: about 50 s per 2D case on 2 CPU cores, see ``docs/explain.md``).

    Raises:
        ValueError: ``method`` is not one of :data:`EXPLAIN_CHOICES`.
        DataError: ``"gradcam"`` without the weights beside ``model.ts``, or weights of another export.

    Example:
        >>> ts, desc = load_torchscript("bundle/men_cmml")  # doctest: +SKIP
        >>> explained_network(ts, desc, "gradcam").training
        False
    """
    if method not in EXPLAIN_CHOICES:
        raise ValueError(f"CMML_EXPLAIN must be 1 or one of {EXPLAIN_CHOICES}, got {method!r}")
    if method == "occlusion":
        return served
    weights = os.path.join(description["model_dir"], WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise DataError(
            f"{description['model_dir']}: no {WEIGHTS_NAME} beside model.ts, which Grad-CAM's eager network needs; "
            "serve the packaged bundle (scripts/package_bundle.py) or set CMML_EXPLAIN=occlusion (slow)"
        )
    if file_sha256(weights) != description.get("weights_sha256"):
        raise DataError(
            f"{weights} is not the file model.ts was exported from (weights_sha256 differs); "
            "package the bundle again (scripts/package_bundle.py)"
        )
    return load_network(description["model_dir"], device=device)


class CasePageOperator(Operator):
    """Writes each case's page ``<output_folder>/<case>.png`` and its DICOM Secondary Capture
    ``<case>.sc.dcm`` (:class:`~cmml_monai.deploy.capture.StudyExplainer`: same study, own series,
    "RESEARCH USE ONLY" burned in), and passes the results on with the SC (``results``: a list of
    ``(StudyCase, CaseResult, SC dataset)``) so that the SR references it.

    Args:
        fragment: the application.
        network: the network the maps are computed on (:func:`explained_network`).
        description: the served model's description.
        output_folder: where the files go (created).
        model_name: the model name in the SC.
        model_version: the model version in the SC.
        series_number: SeriesNumber of the SC series.

    Example:
        >>> pages = CasePageOperator(app, network=explained_network(ts, desc, "gradcam"), description=desc,
        ...                          output_folder="out", model_name=name, model_version=version,
        ...                          name="case_page")  # doctest: +SKIP
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        network: torch.nn.Module,
        description: Mapping[str, Any],
        output_folder: str,
        model_name: str,
        model_version: str,
        series_number: int = SC_SERIES_NUMBER,
        **kwargs: Any,
    ) -> None:
        self.explainer = StudyExplainer(network, description)
        self.output_folder = os.fspath(output_folder)
        self.model_name = model_name
        self.model_version = model_version
        self.series_number = int(series_number)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("results")
        spec.output("results")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        results: Sequence[tuple[StudyCase, CaseResult]] = op_input.receive("results")
        paged = []
        for case, result in results:
            start = time.perf_counter()
            _, _, sc = self.explainer.write(
                case, self.output_folder, self.model_name, self.model_version, self.series_number
            )
            logger.info("%s: case page and SC in %.2f s", case.case_id, time.perf_counter() - start)
            paged.append((case, result, sc))
        op_output.emit(paged, "results")


class SRWriterOperator(Operator):
    """Writes each result as ``<output_folder>/<case>.sr.dcm`` (DICOM Comprehensive SR filed with the study)
    and ``<output_folder>/<case>.json`` (:func:`~cmml_monai.deploy.report.write_report`); a result that comes
    with its case page's SC (:class:`CasePageOperator`) gets it referenced from the SR, and ``index.html`` lists
    the folder's pages.

    Args:
        fragment: the application.
        output_folder: where the files go (created).
        model_name: the model name in the SR and JSON.
        model_version: the model version in the SR and JSON.
        series_number: SeriesNumber of the SR series.

    Example:
        >>> writer = SRWriterOperator(app, output_folder="out", model_name=name, model_version=version,
        ...                           name="sr_writer")  # doctest: +SKIP
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        output_folder: str,
        model_name: str,
        model_version: str,
        series_number: int = SR_SERIES_NUMBER,
        **kwargs: Any,
    ) -> None:
        self.output_folder = os.fspath(output_folder)
        self.model_name = model_name
        self.model_version = model_version
        self.series_number = int(series_number)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("results")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        # (case, result), or (case, result, SC) after the case page operator: the SR references the SC
        results: Sequence[tuple[Any, ...]] = op_input.receive("results")
        for case, result, *pages in results:
            write_report(
                case, result, self.output_folder, self.model_name, self.model_version, self.series_number, pages=pages
            )
        if any(len(item) > 2 for item in results):
            update_index(self.output_folder)
