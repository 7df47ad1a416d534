"""Validation under simulated missingness: score checkpoints on the conditions the sweep tests.

By default a checkpoint is chosen (and early stopping decides) by the AUC on the validation split as
observed, where almost every modality is present. The missing-rate sweep then tests the chosen
checkpoint at rates up to 0.7. With ``val_missing_rates`` set, every validation case is scored once
per rate, with that rate's seeded mask (saved as ``masks_valid.json`` next to the test masks, so
every method is validated on the same masks), and the validation AUC is taken over all those views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from cmml_monai.data.cases import CaseList
from cmml_monai.data.missingness import apply_presence_mask, ensure_split_masks

__all__ = ["PresenceMaskedDataset", "MissingRateViews", "validation_views"]


class PresenceMaskedDataset(Dataset):
    """The cases of a split under one saved presence mask (NaN written into what the mask marks missing).

    The one masking path of the project: validation under missing rates (``MissingRateViews``) and every
    condition of the missing-rate sweep read their cases through it, so the network sees what it would see
    when served with those inputs missing. The wrapped items are not changed in place.

    Args:
        dataset: batch-contract items (``image``, optional ``tabular``, ``label``, ``case_id``) in
            ``case_ids`` order.
        case_ids: the split's case ids, in dataset order.
        mask: ``[N, k]`` bool presence (image modalities, then the table if any).
        channels_per_modality: channels of each image modality (one int for all, or one per modality).
        indices: the dataset positions to expose, in order (default all); e.g. only the cases that keep
            at least one modality.
        extra: keys added to every item (e.g. ``{"missing_rate": 0.5}``).

    Example::

        >>> masked = PresenceMaskedDataset(test_dataset, ids, masks[0.5], 3)  # doctest: +SKIP
        >>> torch.isnan(masked[0]["image"]).any()  # doctest: +SKIP
    """

    def __init__(
        self,
        dataset: Dataset,
        case_ids: Sequence[str],
        mask: np.ndarray,
        channels_per_modality: int | Sequence[int],
        indices: Sequence[int] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if n != len(case_ids):
            raise ValueError(f"the dataset has {n} items but {len(case_ids)} case ids were given")
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2 or mask.shape[0] != n:
            raise ValueError(f"the mask has shape {mask.shape}, expected ({n}, k)")
        self.dataset = dataset
        self.case_ids = [str(c) for c in case_ids]
        self.mask = mask
        self.channels_per_modality = channels_per_modality
        self.indices = list(range(n)) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"indices {bad[:5]} are outside the dataset's {n} items")
        self.extra = dict(extra or {})

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        i = self.indices[index]
        item = dict(self.dataset[i])
        if str(item.get("case_id")) != self.case_ids[i]:
            raise ValueError(
                f"item {i} is case {item.get('case_id')!r}, expected {self.case_ids[i]!r}: "
                "the dataset is not in case-list order"
            )
        present = torch.as_tensor(self.mask[i][None])
        tabular = item.get("tabular")
        table = None if tabular is None else torch.as_tensor(tabular)[None]
        image = torch.as_tensor(item["image"])[None]
        masked_image, masked_tabular = apply_presence_mask(image, table, present, self.channels_per_modality)
        item["image"] = masked_image[0]
        if masked_tabular is not None:
            item["tabular"] = masked_tabular[0]
        item.update(self.extra)
        return item


class MissingRateViews(ConcatDataset):
    """Every case of a split once per missing rate, with that rate's presence mask applied (NaN = missing).

    Item ``r * N + i`` is case ``i`` under rate ``rates[r]`` (rates ascending); it carries ``missing_rate``.
    One ``PresenceMaskedDataset`` per rate.

    Args:
        dataset: batch-contract items (``image``, optional ``tabular``, ``label``, ``case_id``) in
            ``case_ids`` order.
        case_ids: the split's case ids, in dataset order.
        masks: rate -> ``[N, k]`` bool presence (image modalities, then the table if any).
        channels_per_modality: channels of each image modality (one int for all, or one per modality).

    Example::

        >>> views = MissingRateViews(val_dataset, ids, {0.0: full, 0.5: half}, 3)  # doctest: +SKIP
        >>> len(views) == 2 * len(val_dataset)  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        dataset: Dataset,
        case_ids: Sequence[str],
        masks: Mapping[float, np.ndarray],
        channels_per_modality: int | Sequence[int],
    ) -> None:
        if not masks:
            raise ValueError("masks must hold at least one rate")
        by_rate = {float(r): m for r, m in masks.items()}
        self.rates = sorted(by_rate)
        parts = []
        for rate in self.rates:
            try:
                parts.append(
                    PresenceMaskedDataset(
                        dataset, case_ids, by_rate[rate], channels_per_modality, extra={"missing_rate": rate}
                    )
                )
            except ValueError as err:
                raise ValueError(f"rate {rate:g}: {err}") from None
        super().__init__(parts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} views")
        return super().__getitem__(index)


def validation_views(
    dataset: Dataset,
    case_list: CaseList,
    rates: Sequence[float] | None,
    masks_dir: str,
    seed: int = 0,
    split: str = "valid",
) -> Dataset:
    """The dataset that validation scores checkpoints on.

    Args:
        dataset: the split's batch-contract dataset, in ``case_list.split(split)`` order.
        case_list: the dataset's cases.
        rates: missing rates to validate under; ``None`` or empty returns ``dataset`` unchanged
            (the observed presence only).
        masks_dir: where ``masks_<split>.json`` is saved / reused (share it between methods).
        seed: mask seed.
        split: the split ``dataset`` holds.

    Raises:
        ValueError: a rate outside ``[0, 1)`` or a dataset that does not match the split.
    """
    if rates is None or len(rates) == 0:
        return dataset
    rates = [float(r) for r in rates]
    bad = [r for r in rates if not 0.0 <= r < 1.0]
    if bad:
        raise ValueError(f"val_missing_rates must be in [0, 1), got {bad}")
    n_items = len(dataset)  # type: ignore[arg-type]
    case_ids, _, masks = ensure_split_masks(case_list, split, n_items, masks_dir, rates, seed)
    channels = [m.channels for m in case_list.image_modalities]
    return MissingRateViews(dataset, case_ids, {r: masks[r] for r in rates}, channels)
