"""PNG plots of the evaluation: AUC against missing rate, and ROC curves.

Figures are made without pyplot, so importing this module never changes the user's matplotlib backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from cmml_monai.data.jsonio import atomic_path

__all__ = ["plot_sweep", "plot_roc"]


def plot_sweep(rows: Sequence[dict], path: str, title: str = "AUC under missing modalities") -> str:
    """Line plot of ``auc`` against ``rate``, one line per ``method`` in ``rows``; returns ``path``."""
    fig = Figure(figsize=(5, 3.5), dpi=100)
    ax = fig.add_subplot()
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((float(r["rate"]), float(r["auc"])) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("missing rate")
    ax.set_ylabel("macro AUC")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_roc(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], multi_label: bool, path: str, title: str = "ROC"
) -> str:
    """One ROC curve per class (one-vs-rest) or label; classes with a single outcome are left out."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    onehot = labels.reshape(probs.shape) if multi_label else np.eye(probs.shape[1])[labels.reshape(-1).astype(int)]
    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.add_subplot()
    for c in range(probs.shape[1]):
        if onehot[:, c].min() == onehot[:, c].max():
            continue
        fpr, tpr, _ = roc_curve(onehot[:, c], probs[:, c])
        name = class_names[c] if c < len(class_names) else str(c)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: Figure, path: str) -> str:
    """Write ``fig`` to ``path`` atomically (its folder made as needed)."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path
