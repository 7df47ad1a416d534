"""Class weights from the training split, for a loss that weighs rare classes up.

Macro AUC weighs every class equally, while a plain cross-entropy is dominated by the frequent
classes (the real Derm7pt has 575 nevi against 42 basal cell carcinomas). Weights are fitted on the
train split only and handed to :class:`cmml_monai.losses.CMMLLoss`, so every method gets the same.
"""

from __future__ import annotations

from typing import cast

import numpy as np

from cmml_monai.data.cases import CaseList

__all__ = ["BALANCE_MODES", "class_weights"]

#: ``"none"``: no weights; ``"balanced"``: inverse class frequency; ``"sqrt"``: its square root (a
#: milder correction that keeps some of the prior).
BALANCE_MODES = ("none", "balanced", "sqrt")


def class_weights(case_list: CaseList, mode: str = "none", split: str = "train") -> list[float] | None:
    """Per-class loss weights fitted on ``split``.

    Single-label: ``w_c = (n / (K n_c)) ** p`` (``p`` = 1 for ``"balanced"``, 0.5 for ``"sqrt"``),
    rescaled so that the weighted mean over the split's cases is 1 (the loss keeps its scale, so the
    learning rate means the same). Multi-label: the positive weight of each label,
    ``(n_neg / n_pos) ** p`` (``pos_weight`` of a binary cross-entropy).

    Args:
        case_list: the dataset.
        mode: one of :data:`BALANCE_MODES`.
        split: the split the weights are fitted on.

    Returns:
        one weight per class (or label), or ``None`` for ``"none"``.

    Raises:
        ValueError: an unknown mode, or a class with no case in the split (its weight would be
            infinite; say which).

    Example:
        >>> class_weights(case_list, "balanced")  # doctest: +SKIP
        [2.4, 0.3, 0.9, 1.5, 2.2]
    """
    if mode not in BALANCE_MODES:
        raise ValueError(f"class_balance must be one of {BALANCE_MODES}, got {mode!r}")
    if mode == "none":
        return None
    power = 1.0 if mode == "balanced" else 0.5
    cases = case_list.split(split)
    if not cases:
        raise ValueError(f"class_balance {mode!r}: the {split!r} split of {case_list.name!r} has no case")
    names = list(case_list.class_names)
    if case_list.multi_label:
        labels = np.asarray([c.label for c in cases], dtype=float)
        pos = labels.sum(axis=0)
        absent = [n for n, p in zip(names, pos) if p == 0]
        if absent:
            raise ValueError(f"class_balance {mode!r}: no positive {split} case for labels {absent}; use 'none'")
        return [float(w) for w in ((len(cases) - pos) / pos) ** power]
    counts = np.bincount([int(cast(int, c.label)) for c in cases], minlength=len(names)).astype(float)
    absent = [n for n, k in zip(names, counts) if k == 0]
    if absent:
        raise ValueError(f"class_balance {mode!r}: no {split} case of classes {absent}; use 'none'")
    weights = (counts.sum() / (len(names) * counts)) ** power
    weights /= float((weights * counts).sum() / counts.sum())
    return [float(w) for w in weights]
