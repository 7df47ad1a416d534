"""Batch preparation: batch-contract dicts -> ``(image, label, (tabular,), {})`` on the device.

MONAI engines call ``inferer(inputs, network, *args)``, so with ``SimpleInferer`` the network receives
``network(image, tabular)`` exactly as it is served. Simulated missingness is applied to the items
before they are batched (``cmml_monai.data.validation.PresenceMaskedDataset``), not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch

__all__ = ["CMMLPrepareBatch"]


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
