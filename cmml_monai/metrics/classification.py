"""Classification metrics of docs/method.md §17: macro AUC, accuracy, macro F1 (plain NumPy / scikit-learn),
plus the expected calibration error, which shows whether a method's confidence holds when inputs are missing.

Single-label: ``probs`` is ``[N, C]`` (softmax), ``labels`` ``[N]`` class indices; AUC is the macro mean
of one-vs-rest AUCs. Multi-label: ``probs`` is ``[N, L]`` (sigmoid), ``labels`` ``[N, L]`` 0/1; AUC is the
macro mean of per-label AUCs. A class (label) with only one outcome in the data has no AUC: it is
skipped and reported in ``skipped`` instead of crashing. ``MacroAUCMetric`` accumulates the same macro
AUC over an epoch as a MONAI ``CumulativeIterationMetric`` (the ``MacroAUC`` handler wraps it).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from sklearn.metrics import f1_score, roc_auc_score

__all__ = [
    "macro_auc",
    "classification_metrics",
    "expected_calibration_error",
    "to_numpy_probs_labels",
    "MacroAUCMetric",
]

logger = logging.getLogger(__name__)


def to_numpy_probs_labels(probs: Any, labels: Any, multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Convert tensors / lists to ``float64 [N, C]`` probabilities and ``[N]`` int or ``[N, L]`` labels.

    Raises:
        ValueError: shapes that do not match the task.
    """
    p = np.asarray(probs.detach().cpu().float() if hasattr(probs, "detach") else probs, dtype=np.float64)
    y = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be [N, C], got shape {p.shape}")
    if multi_label:
        y = y.reshape(p.shape[0], -1).astype(np.int64)
        if y.shape != p.shape:
            raise ValueError(f"multi-label labels must be [N, L]={p.shape}, got {y.shape}")
    else:
        if y.ndim == 2 and y.shape[1] == p.shape[1] and p.shape[1] > 1 and set(np.unique(y)) <= {0, 1}:
            y = y.argmax(axis=1)  # one-hot
        y = y.reshape(-1).astype(np.int64)
        if y.shape[0] != p.shape[0]:
            raise ValueError(f"labels must be [N={p.shape[0]}], got {y.shape}")
    return p, y


def macro_auc(probs: Any, labels: Any, multi_label: bool = False) -> tuple[float, list[int]]:
    """Macro AUC and the indices of classes (labels) skipped because only one outcome occurs.

    Returns:
        ``(auc, skipped)``; ``auc`` is NaN when every class was skipped or there are no cases.

    Raises:
        ValueError: a single-label class index outside ``[0, C)``.

    Example:
        >>> macro_auc([[0.8, 0.2], [0.3, 0.7]], [0, 1])
        (1.0, [])
    """
    p, y = to_numpy_probs_labels(probs, labels, multi_label)
    if p.shape[0] == 0:
        return float("nan"), list(range(p.shape[1]))
    if not multi_label:
        bad = y[(y < 0) | (y >= p.shape[1])]
        if bad.size:
            raise ValueError(
                f"AUC: label {int(bad[0])} is outside the {p.shape[1]} classes [0, {p.shape[1] - 1}]: "
                "check the label column and num_classes"
            )
    onehot = y if multi_label else np.eye(p.shape[1], dtype=np.int64)[y]
    aucs, skipped = [], []
    for c in range(p.shape[1]):
        col = onehot[:, c]
        if col.min() == col.max():
            skipped.append(c)
            continue
        aucs.append(float(roc_auc_score(col, p[:, c])))
    if skipped:
        logger.warning("AUC: class(es) %s have a single outcome in these %d cases and are skipped", skipped, len(y))
    return (float(np.mean(aucs)) if aucs else float("nan")), skipped


def _binned_calibration_gap(confidence: np.ndarray, outcome: np.ndarray, bins: int) -> float:
    # sum over bins of n_b * |mean outcome - mean confidence| = |sum outcome - sum confidence| per bin
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    gap = np.bincount(index, weights=outcome, minlength=bins) - np.bincount(index, weights=confidence, minlength=bins)
    return float(np.abs(gap).sum() / len(confidence))


def expected_calibration_error(probs: Any, labels: Any, multi_label: bool = False, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-width confidence bins (0 = calibrated).

    Single-label: top-label ECE (confidence = the largest probability, outcome = the arg-max is right).
    Multi-label: each label's probability against its 0/1 outcome, averaged over labels. A model
    that is as sure of a case with a missing modality as of a complete one, but less often right,
    gets a larger ECE at higher missing rates.

    Returns:
        the ECE, NaN when there are no cases.

    Raises:
        ValueError: ``bins < 1``.

    Example::

        >>> expected_calibration_error(np.array([[0.9, 0.1], [0.9, 0.1]]), np.array([0, 1]))  # 90% sure, 50% right
        0.4
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p, y = to_numpy_probs_labels(probs, labels, multi_label)
    return _calibration_error(p, y, multi_label, bins)


def _calibration_error(p: np.ndarray, y: np.ndarray, multi_label: bool, bins: int) -> float:
    # on arrays already checked by to_numpy_probs_labels
    if p.shape[0] == 0:
        return float("nan")
    if multi_label:
        return float(
            np.mean([_binned_calibration_gap(p[:, c], y[:, c].astype(np.float64), bins) for c in range(p.shape[1])])
        )
    return _binned_calibration_gap(p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64), bins)


def classification_metrics(probs: Any, labels: Any, multi_label: bool = False) -> dict[str, Any]:
    """``auc`` (macro), ``acc``, ``f1`` (macro), ``ece`` (expected calibration error), ``n`` and
    ``skipped`` classes for one evaluation.

    Multi-label accuracy is the mean per-label accuracy at threshold 0.5, F1 the macro F1 over labels.
    """
    p, y = to_numpy_probs_labels(probs, labels, multi_label)
    auc, skipped = macro_auc(p, y, multi_label)
    if p.shape[0] == 0:
        nan = float("nan")
        return {"auc": nan, "acc": nan, "f1": nan, "ece": nan, "n": 0, "skipped": skipped}
    pred = (p >= 0.5).astype(np.int64) if multi_label else p.argmax(axis=1)
    acc = float((pred == y).mean())
    f1 = float(f1_score(y, pred, average="macro", zero_division=0))
    ece = _calibration_error(p, y, multi_label, bins=10)
    return {"auc": auc, "acc": acc, "f1": f1, "ece": ece, "n": int(p.shape[0]), "skipped": skipped}


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
