"""Study folder -> DICOM SR + JSON with a served model: what ``python -m cmml_monai.deploy`` and the DICOM
listener run for each study.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cmml_monai.data.errors import DataError
from cmml_monai.deploy.capture import StudyExplainer, update_index
from cmml_monai.deploy.description import load_description, load_network
from cmml_monai.deploy.report import SR_SERIES_NUMBER, StudyResult, model_identity, predict_case, write_report
from cmml_monai.deploy.study import (
    IRREGULAR,
    ClinicalSource,
    SeriesRules,
    Study,
    load_study,
    pseudonym,
    scan_studies,
    study_case,
)

__all__ = ["KEY_ENV", "StudyPipeline", "load_rules", "case_name", "pseudonym_key", "load_studies", "set_log_levels"]

logger = logging.getLogger(__name__)

#: environment variable holding the pseudonym key when none is passed
KEY_ENV = "CMML_PSEUDONYM_KEY"


def set_log_levels(verbose: bool = False) -> None:
    """The log levels of the PACS pipeline: the series selection of each case only with ``verbose``; the
    libraries that may name dataset elements at INFO/DEBUG (pynetdicom's patient attributes, highdicom's
    source instances) at WARNING.

    Example:
        >>> set_log_levels(verbose=True)  # doctest: +SKIP
    """
    if not verbose:
        logging.getLogger("cmml_monai.deploy.study").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def load_rules(path: str | None) -> SeriesRules:
    """:class:`SeriesRules` from a JSON file (``None``: the defaults).

    Raises:
        DataError: the file cannot be read or holds bad rules (the message names the file).

    Example:
        >>> load_rules("site_rules.json").rule_for("t2f")  # doctest: +SKIP
        {'match': ['dark fluid'], 'exclude': []}
    """
    if path is None:
        return SeriesRules()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return SeriesRules.from_json(data)
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
        raise DataError(f"series rules {path}: {e}") from e


def pseudonym_key(key: str | None = None) -> str | None:
    """``key``, else the ``CMML_PSEUDONYM_KEY`` environment variable, else ``None`` (no key).

    Example:
        >>> pseudonym_key(None)  # with CMML_PSEUDONYM_KEY=k  # doctest: +SKIP
        'k'
    """
    return key if key is not None else os.environ.get(KEY_ENV) or None


def load_studies(path: str, each_study: bool = False) -> list[Study]:
    """The study under ``path`` (a folder or DICOMDIR), or each study there with ``each_study``.

    Raises:
        DataError: no DICOM; several studies without ``each_study``.

    Example:
        >>> [s.uid for s in load_studies("/exports/day1", each_study=True)]  # doctest: +SKIP
        ['1.2.826.0.1...', '1.2.826.0.1...']
    """
    return scan_studies(path) if each_study else [load_study(path)]


def case_name(study: Study, key: str | None) -> str:
    """How outputs and logs name ``study``: the keyed hash of its StudyInstanceUID, or a random id without a
    key (logged as such); never a patient identifier.

    Example:
        >>> case_name(load_study("/exports/study_0001"), "site-key")  # doctest: +SKIP
        '3f2a9c01d4e5b6a7'
    """
    if key:
        return pseudonym(study.uid, key)
    name = f"case-{uuid.uuid4().hex[:12]}"
    logger.warning("no pseudonym key (--key or %s): the study is named %s, a random id", KEY_ENV, name)
    return name


class StudyPipeline:
    """Load the served model once; turn each study into an SR and a JSON in ``out_dir``.

    Args:
        bundle: the folder holding ``models/model.pt`` and ``models/network.json``, or that ``models`` folder.
        out_dir: where ``<case>.sr.dcm`` and ``<case>.json`` go.
        rules: series selection (default :class:`SeriesRules` ()).
        clinical: where clinical values come from (default the DICOM header).
        key: pseudonym key (default the ``CMML_PSEUDONYM_KEY`` environment variable); a case without an id of
            the caller is named by the keyed hash of its StudyInstanceUID. Without a key such a case gets a
            random id (logged as such): never a patient identifier.
        device: where the network runs.
        series_number: SeriesNumber of the SR series.
        irregular: a series with unevenly spaced slices: ``"refuse"`` or ``"resample"``
            (:func:`~cmml_monai.deploy.study.study_case`).
        explain: also write the case page ``<case>.png``, its Secondary Capture ``<case>.sc.dcm`` (referenced
            from the SR; :mod:`cmml_monai.deploy.capture`) and ``index.html``.

    Example:
        >>> StudyPipeline("outputs/men_cmml", "results").run("/exports/study_0001")  # doctest: +SKIP
        [('results/3f2a9c01d4e5b6a7.sr.dcm', 'results/3f2a9c01d4e5b6a7.json')]
    """

    def __init__(
        self,
        bundle: str,
        out_dir: str,
        rules: SeriesRules | None = None,
        clinical: ClinicalSource | None = None,
        key: str | None = None,
        device: str | torch.device = "cpu",
        series_number: int = SR_SERIES_NUMBER,
        irregular: str = "refuse",
        explain: bool = False,
    ) -> None:
        if irregular not in IRREGULAR:
            raise ValueError(f"irregular must be one of {IRREGULAR}, got {irregular!r}")
        self.bundle = os.fspath(bundle)
        self.description: Mapping[str, Any] = load_description(self.bundle)
        self.network = load_network(self.bundle, device=device)
        self.model_name, self.model_version = model_identity(self.description, self.bundle)
        self.out_dir = os.fspath(out_dir)
        self.rules = rules or SeriesRules()
        self.clinical = clinical or ClinicalSource()
        self.key = pseudonym_key(key)
        self.series_number = int(series_number)
        self.irregular = irregular
        # -- issue 32: the case page as a Secondary Capture beside the SR (``explain``) --
        self.explainer = StudyExplainer(self.network, self.description) if explain else None
        #: SR path -> the SC path written with it (the listener sends both)
        self.captures: dict[str, str] = {}

    def case_id_for(self, study: Study) -> str:
        """The pseudonym of ``study`` (keyed hash of its StudyInstanceUID), or a random id without a key."""
        return case_name(study, self.key)

    def run_study(self, study: Study, case_id: str | None = None) -> tuple[str, str]:
        """SR and JSON of one study; returns their paths."""
        result = self.results_for(study, case_id)
        return result.sr_path, result.json_path

    def results_for(
        self, study: Study, case_id: str | None = None, version: int = 1, previous: Sequence[Any] = ()
    ) -> StudyResult:
        """Every result object of one study: the SR and JSON written to ``out_dir``, and the DICOM files to
        send (:attr:`StudyResult.dicom_files`). ``version`` > 1 with the ``previous`` SRs (pydicom Datasets)
        it replaces: the study came again with other content.

        Raises:
            DataError: a bad series, no series matching the model's sequences.

        Example:
            >>> pipe = StudyPipeline("bundle", "out")  # doctest: +SKIP
            >>> pipe.results_for(load_study("/exports/s1"), "c1").dicom_files
            ['out/c1.sr.dcm']
        """
        name = case_id or self.case_id_for(study)
        case = study_case(study, self.description, name, self.rules, self.clinical, irregular=self.irregular)
        if not case.present_images:
            # an SR references the images it was computed from: without any, stop before running the model
            raise DataError(
                f"{name}: no series matches any of {list(case.selection)}; check the series rules "
                "(--rules) or the study"
            )
        result = predict_case(self.network, self.description, case)
        pages, captures = [], []
        if self.explainer is not None:  # the case page and its SC first, so the SR can reference the SC
            _, sc_path, sc = self.explainer.write(
                case, self.out_dir, self.model_name, self.model_version, version=int(version)
            )
            pages, captures = [sc], [sc_path]
        sr_path, json_path = write_report(
            case,
            result,
            self.out_dir,
            self.model_name,
            self.model_version,
            self.series_number,
            version=version,
            previous=previous,
            pages=pages,
        )
        if captures:
            self.captures[sr_path] = captures[0]
            update_index(self.out_dir)
        return StudyResult(name, sr_path, json_path, int(version), [sr_path, *captures])

    def run(self, path: str, case_id: str | None = None, each_study: bool = False) -> list[tuple[str, str]]:
        """SR and JSON of the study under ``path`` (a folder or DICOMDIR), or of each study with ``each_study``.

        With ``each_study`` a bad study is logged (one line) and the others are still processed; the error is
        raised at the end.

        Raises:
            DataError: no DICOM, several studies without ``each_study``, a bad series; ``case_id`` with
                several studies.
        """
        studies = load_studies(path, each_study)
        if case_id is not None and len(studies) > 1:
            raise DataError(
                f"--case-id names one case but {path} holds {len(studies)} studies; "
                "omit it (each study is named by its pseudonym)"
            )
        done, failed = [], []
        for study in studies:
            try:
                done.append(self.run_study(study, case_id))
            except DataError as e:
                if len(studies) == 1:
                    raise
                logger.error("a study was not processed: %s", e)
                failed.append(str(e))
        if failed:
            raise DataError(
                f"{len(failed)} of {len(studies)} studies not processed (the others were written): {failed[0]}"
            )
        return done
