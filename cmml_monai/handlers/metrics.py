"""Ignite metric handler for macro AUC that skips (and names) classes absent from the data."""

from __future__ import annotations

from collections.abc import Callable

from monai.handlers.ignite_metric import IgniteMetricHandler

from cmml_monai.metrics.classification import MacroAUCMetric

__all__ = ["MacroAUC"]


class MacroAUC(IgniteMetricHandler):
    """Macro AUC (one-vs-rest for multi-class, per label for multi-label) as an Ignite metric.

    Not MONAI's ``ROCAUC``: it averages a class absent from the data in as NaN, so a small validation set
    without one class would have no key metric; this skips the class and names it in the log. A label
    outside ``[0, num_classes)`` is refused with one line naming it.

    Args:
        multi_label: multi-label task.
        activation: applied to ``pred`` first (``None`` when postprocessing already did it).
        output_transform: ``engine.state.output`` -> ``(y_pred, y)``, e.g. ``from_engine(["pred", "label"])``.

    Example:
        >>> from monai.handlers import from_engine
        >>> auc = MacroAUC(output_transform=from_engine(["pred", "label"]))
        >>> auc.attach(evaluator, "val_auc")  # doctest: +SKIP
    """

    def __init__(
        self, multi_label: bool = False, activation: str | None = None, output_transform: Callable = lambda x: x
    ) -> None:
        super().__init__(
            metric_fn=MacroAUCMetric(multi_label=multi_label, activation=activation),
            output_transform=output_transform,
            save_details=False,
        )
