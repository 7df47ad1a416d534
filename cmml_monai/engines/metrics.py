"""Classification metrics of DESIGN section 5: macro AUC, accuracy, macro F1 (plain NumPy / scikit-learn).

Single-label: ``probs`` is ``[N, C]`` (softmax), ``labels`` ``[N]`` class indices; AUC is the macro mean
of one-vs-rest AUCs. Multi-label: ``probs`` is ``[N, L]`` (sigmoid), ``labels`` ``[N, L]`` 0/1; AUC is the
macro mean of per-label AUCs. A class (label) with only one outcome in the data has no AUC: it is
skipped and reported in ``skipped`` instead of crashing.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

__all__ = ["macro_auc", "classification_metrics", "to_numpy_probs_labels"]

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
    """
    p, y = to_numpy_probs_labels(probs, labels, multi_label)
    if p.shape[0] == 0:
        return float("nan"), list(range(p.shape[1]))
    onehot = y if multi_label else np.eye(p.shape[1], dtype=np.int64)[np.clip(y, 0, p.shape[1] - 1)]
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


def classification_metrics(probs: Any, labels: Any, multi_label: bool = False) -> dict[str, Any]:
    """``auc`` (macro), ``acc``, ``f1`` (macro), ``n`` and ``skipped`` classes for one evaluation.

    Multi-label accuracy is the mean per-label accuracy at threshold 0.5, F1 the macro F1 over labels.
    """
    p, y = to_numpy_probs_labels(probs, labels, multi_label)
    auc, skipped = macro_auc(p, y, multi_label)
    if p.shape[0] == 0:
        return {"auc": float("nan"), "acc": float("nan"), "f1": float("nan"), "n": 0, "skipped": skipped}
    pred = (p >= 0.5).astype(np.int64) if multi_label else p.argmax(axis=1)
    acc = float((pred == y).mean())
    f1 = float(f1_score(y, pred, average="macro", zero_division=0))
    return {"auc": auc, "acc": acc, "f1": f1, "n": int(p.shape[0]), "skipped": skipped}
