"""MONAI Label's answer with the case page: a classification task whose result file is the page's PNG.

MONAI Label's infer protocol returns a result file with the result JSON: ``InferTask.__call__`` gives
``(result_file, result_json)``, and the server's ``POST /infer/{model}`` sends both as one multipart answer
(``output=all``: the file as ``image``, the JSON as ``params``), the file alone (``output=image``) or the JSON
alone (``output=json``). For a segmentation the file is the label mask; a classification task's writer
(``ClassificationWriter``) returns no file. :class:`CasePageInferTask` keeps that JSON (the class scores) and
returns the case page (:mod:`cmml_monai.evaluation.casepage`) as the file: the request's image with its
Grad-CAM map, the other modalities and the table marked missing, the probabilities, "RESEARCH USE ONLY".

The maps are Grad-CAM on the eager network rebuilt from the bundle's ``models/network.json`` and
``models/model.pt`` (:func:`~cmml_monai.deploy.description.load_network`; the weights MONAI Label's own
``network_def`` loads), on the image MONAI Label preprocessed (:class:`~cmml_monai.deploy.label.LabelRequestd`)
and without the table, as MONAI Label calls the network (``network(image)``): the page's probabilities are the
answer's scores. The page names the case by the request's ``case_id`` (default ``request``), never by the image's
file name, which in a datastore is often a patient or accession number.

Importable only where ``monailabel`` is installed (its own environment, see ``docs/monai-label.md``)::

    from cmml_monai.deploy.label_task import CasePageInferTask
    task = CasePageInferTask("bundle/derm7pt_cmml")
    page_png, result = task({"image": "/data/case.jpg", "modality": "derm", "device": "cpu"})
    result["prediction"]  # [{"idx": 0, "label": "bcc", "score": 0.12}, ...]; result["case_page"]: the maps
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from monai.utils import convert_to_tensor
from monailabel.tasks.infer.bundle import BundleInferTask

from cmml_monai.deploy.description import load_description, load_network
from cmml_monai.deploy.inference import case_explainer
from cmml_monai.evaluation.casepage import save_page
from cmml_monai.evaluation.explain import Explainer

__all__ = ["CasePageInferTask", "CASE_PAGE_KEY"]

#: the request key that turns the page on or off (default: the task's ``case_page``)
CASE_PAGE_KEY = "case_page"
_FALSE = ("0", "false", "no", "off")


class CasePageInferTask(BundleInferTask):
    """A packaged bundle as a MONAI Label classification task that answers with the case page's PNG as the
    result file and the class scores (plus ``case_page``: the maps' method, the explained class, the inputs
    completed) as the result JSON.

    Args:
        path: the packaged bundle (``scripts/package_bundle.py``).
        conf: MONAI Label's app configuration (default none).
        case_page: write the page unless the request says ``"case_page": false``.
        kwargs: passed to ``BundleInferTask`` (default ``type="classification"``, ``add_post_restore=False``).

    Example:
        >>> task = CasePageInferTask("bundle/derm7pt_cmml")  # doctest: +SKIP
        >>> png, result = task({"image": "case.jpg", "modality": "derm", "device": "cpu"})
        >>> result["case_page"]["maps"]
        'Grad-CAM'
    """

    def __init__(self, path: str, conf: Mapping[str, Any] | None = None, case_page: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("type", "classification")
        kwargs.setdefault("add_post_restore", False)
        super().__init__(path, dict(conf or {}), **kwargs)
        self.case_page = bool(case_page)
        self.model_dir = os.path.join(os.fspath(path), "models")
        #: device -> the explainer on the eager network there (built on the first page)
        self.page_explainers: dict[str, Explainer] = {}

    @functools.cached_property
    def network_description(self) -> dict[str, Any]:
        """The bundle's ``models/network.json``, read once (on the first page)."""
        return load_description(self.model_dir)

    def page_explainer(self, device: Any) -> Explainer:
        """The Grad-CAM explainer of the bundle's eager network on ``device``, built once."""
        key = str(device)
        if key not in self.page_explainers:
            network = load_network(self.model_dir, device=key)
            self.page_explainers[key] = case_explainer(network, self.network_description)
        return self.page_explainers[key]

    def writer(self, data: dict[str, Any], extension: Any = None, dtype: Any = None) -> tuple[Any, Any]:
        """The classification JSON of ``BundleInferTask``, with the case page as the result file."""
        result_file, result = super().writer(data, extension, dtype)
        if str(data.get(CASE_PAGE_KEY, self.case_page)).lower() in _FALSE:
            return result_file, result
        explainer = self.page_explainer(data.get("device", "cpu"))
        # LabelRequestd's packed input (NaN = missing), as a plain tensor: MONAI's hooks need no metadata
        image = convert_to_tensor(data["image"], dtype=torch.float32, track_meta=False)[None]
        explanation = explainer(image, None, str(data.get("case_id") or "request"))
        prep = self.network_description.get("preprocessing") or {}
        # a temporary file: the server deletes a result file once it has sent it
        fd, png = tempfile.mkstemp(prefix="cmml-case-page-", suffix=".png")
        os.close(fd)
        save_page(explanation, png, prep.get("mean"), prep.get("std"))
        result[CASE_PAGE_KEY] = {
            "maps": explanation.method,
            "explained_class": explanation.target,
            "completed": explanation.completed,
            "research_use_only": True,
        }
        return png, result
