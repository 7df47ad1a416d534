"""Batch preparation: batch-contract dicts -> ``(image, label, (tabular,), {})`` on the device.

MONAI engines call ``inferer(inputs, network, *args)``, so with ``SimpleInferer`` the network receives
``network(image, tabular)`` exactly as it is served. ``MaskedPrepareBatch`` also writes NaN into the
modalities a saved presence mask marks missing (the evaluation sweep of docs/method.md §17).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.engines.utils import PrepareBatch

from cmml_monai.data.missingness import apply_presence_mask

__all__ = ["CMMLPrepareBatch", "MaskedPrepareBatch"]


class CMMLPrepareBatch(PrepareBatch):
    """Moves ``image``, ``tabular`` (when the dataset has a table) and ``label`` to the device."""

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
        image = torch.as_tensor(batchdata["image"]).to(device=device, non_blocking=non_blocking, **kwargs)
        tab = batchdata.get("tabular")
        tabular = None if tab is None else torch.as_tensor(tab).to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata.get("label")
        if label is not None:
            label = torch.as_tensor(label).to(device=device, non_blocking=non_blocking)
        return image, label, (tabular,), {}


class MaskedPrepareBatch(CMMLPrepareBatch):
    """``CMMLPrepareBatch`` that first applies a per-case presence mask (NaN = missing).

    Args:
        masks: case id -> ``[k]`` bool presence (image modalities in order, then the table if any).
        channels_per_modality: channels of each image modality (one int for all, or one per modality).
    """

    def __init__(self, masks: Mapping[str, Sequence[bool] | np.ndarray], channels_per_modality: int | Sequence[int]):
        self.masks = {str(k): np.asarray(v, dtype=bool) for k, v in masks.items()}
        self.channels_per_modality = channels_per_modality

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
        image, label, (tabular,), kw = super().__call__(batchdata, device, non_blocking, **kwargs)
        ids = [str(c) for c in batchdata["case_id"]]
        unknown = [c for c in ids if c not in self.masks]
        if unknown:
            raise ValueError(f"no presence mask for case ids {unknown[:5]}; the masks belong to another split")
        present = torch.as_tensor(np.stack([self.masks[c] for c in ids]), device=image.device)
        # no table in the batch: apply_presence_mask ignores the mask's table column
        image, tabular = apply_presence_mask(image, tabular, present, self.channels_per_modality)
        return image, label, (tabular,), kw
