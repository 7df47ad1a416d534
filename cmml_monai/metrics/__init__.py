"""cmml_monai.metrics: pure tensor / NumPy classification metrics (macro AUC, accuracy, macro F1, ECE).

The layer above ``losses`` and below ``engines``: nothing here knows about Ignite engines or handlers,
so the sweep, the reports and the ``MacroAUC`` handler all score with the same functions.
"""

from cmml_monai.metrics.classification import (
    MacroAUCMetric,
    classification_metrics,
    expected_calibration_error,
    macro_auc,
    to_numpy_probs_labels,
)

__all__ = [
    "macro_auc",
    "classification_metrics",
    "expected_calibration_error",
    "to_numpy_probs_labels",
    "MacroAUCMetric",
]
