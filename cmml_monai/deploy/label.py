"""MONAI Label: a packaged bundle answers a one-image request as a classification bundle.

MONAI Label's ``BundleInferTask`` reads the bundle's ``configs/inference.json``: ``network_def`` (the
described network, its weights from ``models/model.pt``), ``preprocessing``, ``inferer`` and
``postprocessing``; it sends one image per request (``{"image": path, ...}``). The network takes every
modality packed along channels (NaN = missing) and the table, so :class:`LabelRequestd` turns the request
into that input: the image fills one modality (the request's ``modality``, default the first image
modality), every other modality and the table are missing, and the preprocessing is the one inference
uses (:func:`cmml_monai.data.dataset.case_transforms` with the run's description), so MONAI Label and
``configs/inference.json`` give the same probabilities for the same image-only case.
:func:`label_postprocessing` makes the logits the probabilities MONAI Label's classification writer lists.

In a MONAI Label app::

    from monailabel.tasks.infer.bundle import BundleInferTask
    task = BundleInferTask("bundle/derm7pt", conf={}, type="classification", add_post_restore=False)
    _, result = task({"image": "/data/case.jpg", "modality": "derm", "device": "cpu"})
    result["prediction"]  # [{"idx": 0, "label": "bcc", "score": 0.12}, ...]
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import Activationsd, Compose, EnsureTyped, Transform

from cmml_monai.data.cases import CaseList, ModalitySpec
from cmml_monai.data.dataset import case_transforms
from cmml_monai.data.errors import DataError
from cmml_monai.deploy.description import description_preprocessing, description_schema

__all__ = ["LabelRequestd", "label_postprocessing", "MODALITY_KEY"]

#: the request key that names the modality the image is
MODALITY_KEY = "modality"


def _case_list(description: Mapping[str, Any]) -> CaseList:
    """The described dataset's layout with no case: what ``case_transforms`` reads from a case list."""
    data = description["data"]
    return CaseList(
        name=str(data["dataset"]),
        modalities=[ModalitySpec(m["name"], m["kind"], int(m["channels"])) for m in data["modalities"]],
        class_names=[str(c) for c in data["class_names"]],
        multi_label=bool(data["multi_label"]),
        table_columns=[str(c) for c in data.get("table_columns") or []],
        cases=[],
    )


class LabelRequestd(Transform):
    """A MONAI Label request ``{"image": path, "modality": name?}`` -> the network's ``image`` (and ``tabular``).

    Args:
        description: the run's network description (``models/network.json``).
        modality: the modality the image is when the request does not say (default: the first image modality).
        image_key: the request key holding the image path (MONAI Label's ``image``); the packed image
            ``[M*C, *spatial]`` replaces it.
        modality_key: the request key naming the modality.

    Raises:
        DataError: a modality that the network does not have, or a request without an image path.

    Example:
        >>> t = LabelRequestd(load_description("bundle/derm7pt/models"), "derm")  # doctest: +SKIP
        >>> t({"image": "case.jpg"})["image"].shape  # the clinic channels are NaN: missing
        torch.Size([6, 224, 224])
    """

    def __init__(
        self,
        description: Mapping[str, Any],
        modality: str | None = None,
        image_key: str = "image",
        modality_key: str = MODALITY_KEY,
    ) -> None:
        self.case_list = _case_list(description)
        self.names = [m.name for m in self.case_list.image_modalities]
        self.modality = self._check(modality or self.names[0])
        self.image_key = image_key
        self.modality_key = modality_key
        # the chain inference uses (inference_dataset -> build_dataset), built from the same description
        self.chain = case_transforms(
            self.case_list,
            description_schema(description),
            **description_preprocessing(description),
            with_label=False,
        )

    def _check(self, modality: Any) -> str:
        if str(modality) not in self.names:
            raise DataError(f"modality {modality!r} is not one of the network's image modalities {self.names}")
        return str(modality)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        path = d.get(self.image_key)
        if not isinstance(path, (str, os.PathLike)):
            raise DataError(f"request key {self.image_key!r} holds {type(path).__name__}, not an image path")
        modality = self._check(d.get(self.modality_key) or self.modality)
        case: dict[str, Any] = {"case_id": os.path.basename(os.fspath(path))}
        case.update({name: os.fspath(path) if name == modality else None for name in self.names})
        if self.case_list.has_table:
            case["table"] = {c: None for c in self.case_list.table_columns}  # no table: every cell missing
        item = self.chain(case)
        d[self.image_key] = item["image"]
        if "tabular" in item:
            d["tabular"] = item["tabular"]
        d[self.modality_key] = modality
        return d


def label_postprocessing(description: Mapping[str, Any], key: str = "pred") -> Compose:
    """Logits -> probabilities (softmax, or a sigmoid per label) as a MetaTensor, which MONAI Label's
    ``ClassificationWriter`` reads (it logs ``pred.array``).

    Example:
        >>> post = label_postprocessing({"data": {"multi_label": False}})
        >>> post({"pred": torch.zeros(4)})["pred"].tolist()  # doctest: +SKIP
        [0.25, 0.25, 0.25, 0.25]
    """
    multi = bool(description["data"]["multi_label"])
    return Compose([Activationsd(keys=key, softmax=not multi, sigmoid=multi), EnsureTyped(keys=key, track_meta=True)])
