"""Pieces every synthetic generator shares: class-evidence views, JPEG writing, the manifest counts.

Example:
    >>> views = class_views(np.random.default_rng(0), np.eye(2)[[0, 1]], 3)
    >>> len(views), views[0].shape
    (3, (2, 2))
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np
from PIL import Image

__all__ = ["softmax", "class_views", "write_jpeg", "manifest_counts"]


def softmax(x: np.ndarray, t: float = 1.0) -> np.ndarray:
    """Softmax of ``t * x`` over the last axis."""
    z = np.exp(t * (x - x.max(axis=-1, keepdims=True)))
    return z / z.sum(axis=-1, keepdims=True)


def class_views(
    rng: np.random.Generator,
    onehot: np.ndarray,
    n_views: int,
    signal: float = 2.0,
    shared: float = 0.8,
    own: float = 1.0,
) -> list[np.ndarray]:
    """Per-modality noisy views of the class evidence: shared noise links them, own noise separates them."""
    base = signal * onehot + shared * rng.standard_normal(onehot.shape)
    return [base + own * rng.standard_normal(onehot.shape) for _ in range(n_views)]


def write_jpeg(arr: np.ndarray, path: str, quality: int = 88) -> None:
    """Write an RGB array (clipped to 0-255) as a JPEG."""
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=quality)


def manifest_counts(
    labels: dict[str, Any],
    splits: dict[str, str],
    class_names: Sequence[str],
    multi_label: bool,
    missing: dict[str, dict[str, str]],
    modality_names: Sequence[str],
    dropped: list[tuple[str, str]],
) -> dict[str, Any]:
    """The manifest counts, computed from what was written (same definitions as ``report.summarize``)."""
    counts = Counter(splits[c] for c in labels)
    if multi_label:
        label_counts = {n: int(sum(labels[c][j] for c in labels)) for j, n in enumerate(class_names)}
    else:
        label_counts = {n: int(sum(labels[c] == j for c in labels)) for j, n in enumerate(class_names)}
    miss = {m: 0 for m in modality_names}
    reasons: dict[str, dict[str, int]] = {m: {} for m in modality_names}
    for cid in labels:
        for m, why in missing.get(cid, {}).items():
            miss[m] += 1
            reasons[m][why] = reasons[m].get(why, 0) + 1
    return {
        "n_cases": len(labels),
        "splits": {s: int(counts.get(s, 0)) for s in ("train", "valid", "test")},
        "label_counts": label_counts,
        "missing": miss,
        "missing_reasons": {m: r for m, r in reasons.items() if r},
        "dropped": len(dropped),
    }
