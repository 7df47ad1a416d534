"""Ignite metric handler for macro AUC that skips (and names) classes absent from the data."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.handlers.ignite_metric import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric

from cmml_monai.engines.metrics import macro_auc

__all__ = ["MacroAUCMetric", "MacroAUC"]


class MacroAUCMetric(CumulativeIterationMetric):
    """Accumulates probabilities and labels over an epoch; ``aggregate`` gives the macro AUC.

    Args:
        multi_label: labels are ``[N, L]`` 0/1 (per-label AUC) instead of ``[N]`` indices (one-vs-rest).
        activation: ``"softmax"``, ``"sigmoid"`` or ``None`` (predictions are already probabilities).
    """

    def __init__(self, multi_label: bool = False, activation: str | None = None) -> None:
        super().__init__()
        if activation not in (None, "softmax", "sigmoid"):
            raise ValueError(f"activation must be None, 'softmax' or 'sigmoid', got {activation!r}")
        self.multi_label = multi_label
        self.activation = activation
        self.skipped: list[int] = []

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y_pred = y_pred.float().reshape(y_pred.shape[0], -1)
        if self.activation == "softmax":
            y_pred = torch.softmax(y_pred, dim=1)
        elif self.activation == "sigmoid":
            y_pred = torch.sigmoid(y_pred)
        return y_pred, y.reshape(y.shape[0], -1).float()

    def aggregate(self) -> float:  # type: ignore[override]
        y_pred, y = self.get_buffer()
        if not isinstance(y_pred, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ValueError("no predictions were accumulated: the data loader is empty")
        labels = y if self.multi_label else y.reshape(-1)
        auc, self.skipped = macro_auc(y_pred, labels, self.multi_label)
        return auc


class MacroAUC(IgniteMetricHandler):
    """Macro AUC (one-vs-rest for multi-class, per label for multi-label) as an Ignite metric.

    Args:
        multi_label: multi-label task.
        activation: applied to ``pred`` first (``None`` when postprocessing already did it).
        output_transform: ``engine.state.output`` -> ``(y_pred, y)``, e.g. ``from_engine(["pred", "label"])``.
    """

    def __init__(
        self, multi_label: bool = False, activation: str | None = None, output_transform: Callable = lambda x: x
    ) -> None:
        super().__init__(
            metric_fn=MacroAUCMetric(multi_label=multi_label, activation=activation),
            output_transform=output_transform,
            save_details=False,
        )
