"""Ignite metric handler for macro AUC that skips (and names) classes absent from the data."""

from __future__ import annotations

from collections.abc import Callable

from monai.handlers.ignite_metric import IgniteMetricHandler

from cmml_monai.metrics.classification import MacroAUCMetric

__all__ = ["MacroAUC"]


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
