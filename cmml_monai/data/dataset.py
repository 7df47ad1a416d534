"""Datasets and loaders: case lists to batch-contract items, decoded once and cached.

Example:
    >>> ds = build_dataset(cases, "train", schema, spatial_size=(224, 224), cache="cache")  # doctest: +SKIP
    >>> loader = build_dataloader(ds, batch_size=32, shuffle=True, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset, DistributedSampler
from monai.transforms import Compose, Transform
from torch.utils.data import default_collate

from cmml_monai.data.caching import (
    CaseCacheDataset,
    CaseDataset,
    CasePersistentDataset,
    check_disk,
    hash_with_file_stats,
    item_nbytes,
    settings_fingerprint,
)
from cmml_monai.data.cases import SPLITS, Case, CaseList
from cmml_monai.data.readers import LoadModalityd
from cmml_monai.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ApplyToPresentd,
    PackModalitiesd,
    TableEncoder,
    image_transforms,
    resolve_pixdim,
)
from cmml_monai.utils import as_bool

logger = logging.getLogger(__name__)

__all__ = [
    "RESERVED_KEYS",
    "CaseDataset",
    "CaseCacheDataset",
    "CasePersistentDataset",
    "data_dicts",
    "case_transforms",
    "hash_with_file_stats",
    "item_nbytes",
    "build_dataset",
    "split_dataset",
    "collate_cases",
    "build_dataloader",
]

RESERVED_KEYS = ("image", "tabular", "label", "case_id", "table")
CACHE_MODES = ("none", "cache", "persistent")


def _cases(case_list: CaseList, split: str | Sequence[str] | None) -> list[Case]:
    if split is None:
        return list(case_list.cases)
    splits = [split] if isinstance(split, str) else list(split)
    known = sorted({c.split for c in case_list.cases} | set(SPLITS))
    bad = [s for s in splits if s not in known]
    if bad:  # a typo would otherwise give an empty dataset; a standard split may be empty
        raise ValueError(f"split {bad} is not one of the splits {known}")
    return [c for c in case_list.cases if c.split in splits]


def _image_keys(case_list: CaseList) -> list[str]:
    keys = [m.name for m in case_list.image_modalities]
    clash = [k for k in keys if k in RESERVED_KEYS]
    if clash:
        raise ValueError(f"modality names {clash} clash with the batch keys {list(RESERVED_KEYS)}; rename them")
    return keys


def data_dicts(
    case_list: CaseList, split: str | Sequence[str] | None = None, with_label: bool = True
) -> list[dict[str, Any]]:
    """Turn cases into the dicts the MONAI transforms consume.

    Args:
        case_list: the dataset.
        split: ``"train"`` / ``"valid"`` / ``"test"``, several of them, or ``None`` for all cases.
        with_label: include ``label`` (False for inference manifests).

    Returns:
        one dict per case: ``case_id``, one key per image modality (path or ``None``), ``table``
        (raw row restricted to the table columns; only when the dataset has a table) and ``label``.

    Example:
        >>> data_dicts(case_list, "train")[0]  # doctest: +SKIP
        {'case_id': '12', 'clinic': None, 'derm': '.../Fal009.jpg', 'table': {'sex': 'female'}, 'label': 1}
    """
    keys = _image_keys(case_list)
    out = []
    for case in _cases(case_list, split):
        d: dict[str, Any] = {"case_id": str(case.case_id)}
        for k in keys:
            p = case.paths.get(k)
            d[k] = None if p is None else os.fspath(p)
        if case_list.has_table:
            d["table"] = {c: case.table.get(c) for c in case_list.table_columns}
        if with_label:
            d["label"] = case.label
        out.append(d)
    return out


def case_transforms(
    case_list: CaseList,
    schema: TableEncoder | None,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | None = None,
    reader: str = "itk",
    series: str | Mapping[Hashable, str | None] | None = None,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    with_label: bool = True,
) -> Compose:
    """The deterministic chain from a data dict to a batch-contract item.

    Args:
        case_list: gives the image modalities (kind, channels), multi-label flag and table presence.
        schema: fitted table encoder; required when the dataset has a table, ignored otherwise.
        spatial_size, pixdim, mean, std: see :func:`cmml_monai.data.transforms.image_transforms`.
        reader, series: see :class:`cmml_monai.data.readers.LoadModalityd`.
        with_label: require a label.
    """
    mods = case_list.image_modalities
    if not mods:
        raise ValueError(f"dataset {case_list.name!r} has no image modality to pack")
    kinds = sorted({m.kind for m in mods})
    if len(kinds) != 1:
        raise ValueError(f"dataset {case_list.name!r} mixes image kinds {kinds}; one packed tensor needs one kind")
    kind = kinds[0]
    if case_list.has_table and schema is None:
        raise ValueError(f"dataset {case_list.name!r} has a table: pass the fitted TableSchema as schema")
    keys = _image_keys(case_list)
    chain = image_transforms(kind, spatial_size, pixdim, **({"mean": mean, "std": std} if kind == "image2d" else {}))
    return Compose(
        [
            LoadModalityd(keys, kind, reader=reader, series=series),
            ApplyToPresentd(keys, chain),
            PackModalitiesd(
                keys,
                [m.channels for m in mods],
                spatial_size,
                schema=schema if case_list.has_table else None,
                multi_label=case_list.multi_label,
                with_label=with_label,
            ),
        ]
    )


def build_dataset(
    case_list: CaseList,
    split: str | Sequence[str] | None,
    schema: TableEncoder | None,
    *,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | None = None,
    cache: str = "none",
    cache_dir: str | os.PathLike | None = None,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    reader: str = "itk",
    series: str | Mapping[Hashable, str | None] | None = None,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    with_label: bool = True,
    progress: bool = False,
    augment: Transform | None = None,
    defer_errors: bool = False,
    cache_max_gb: float | None = None,
) -> Dataset:
    """A MONAI dataset of batch-contract items (``image``, ``tabular``, ``label``, ``case_id``).

    Args:
        case_list: the dataset (from ``cmml_monai.data.adapters.load_dataset``).
        split: split name(s), or ``None`` for every case (inference).
        schema: table encoder fitted on the train split (``None`` when the dataset has no table).
        spatial_size: common spatial shape (2 values for 2D datasets, 3 for 3D).
        pixdim: 3D target spacing in mm (``None``: native spacing).
        cache: ``"none"`` (decode every access), ``"cache"`` (``CacheDataset`` in memory) or
            ``"persistent"`` (``PersistentDataset`` under ``cache_dir``).
        cache_dir: folder of the persistent cache (a sub-folder per preprocessing settings and schema).
        cache_rate: fraction of items cached by ``"cache"``.
        num_workers: threads used to fill the ``"cache"`` cache.
        reader: DICOM reader, ``"itk"`` or ``"pydicom"``.
        series: DICOM series selector(s) for folders holding several series.
        mean, std: 2D normalisation (per RGB channel).
        with_label: False for inference cases without labels.
        progress: show the caching progress bar.
        augment: a random transform run on each packed item after the cache (training only; e.g.
            :func:`cmml_monai.data.augmentation.build_augmentation`); ``None`` for none.
        defer_errors: ``"cache"`` only: record bad items in ``dataset.load_errors`` while the cache fills
            instead of raising the first (for :func:`cmml_monai.data.preflight.run_preflight`).
        cache_max_gb: bound of the split's cache, in GB (``None``: unbounded); see docs/datasets.md.

    Returns:
        a :class:`~cmml_monai.data.caching.CaseDataset`, ``CaseCacheDataset`` or ``CasePersistentDataset``.

    Example:
        >>> ds = build_dataset(cases, "train", schema, spatial_size=(224, 224), cache="cache")  # doctest: +SKIP
        >>> ds[0]["image"].shape  # [M*C, 224, 224]
    """
    _check_build_options(cache, cache_rate, num_workers, cache_max_gb)
    pixdim = resolve_pixdim(pixdim)
    data = data_dicts(case_list, split, with_label=with_label)
    transform = case_transforms(
        case_list, schema, spatial_size, pixdim, reader=reader, series=series, mean=mean, std=std, with_label=with_label
    )
    if augment is not None:
        # the caches keep everything before the first random transform: decoding stays cached
        transform = Compose([*transform.transforms, augment])
    if cache == "none":
        return CaseDataset(data, transform)
    item_bytes = item_nbytes(case_list, spatial_size)
    if cache == "cache":
        # the cache is filled here: decoding errors surface now
        return CaseCacheDataset(
            data,
            transform,
            cache_num=len(data) if cache_max_gb is None else _cache_bound(cache_max_gb, item_bytes, len(data), split),
            cache_rate=float(cache_rate),
            num_workers=int(num_workers) or 1,
            progress=as_bool(progress, "progress"),
            defer_errors=as_bool(defer_errors, "defer_errors"),
        )
    if cache_dir is None:
        raise ValueError("cache='persistent' needs cache_dir (a folder for the preprocessed items)")
    settings = _cache_settings(case_list, spatial_size, pixdim, reader, series, mean, std, with_label)
    folder = os.path.join(os.fspath(cache_dir), settings_fingerprint(settings, schema if case_list.has_table else None))
    return _persistent_dataset(data, transform, folder, cache_max_gb, item_bytes, split)


def _persistent_dataset(
    data: list[dict[str, Any]], transform: Compose, folder: str, cache_max_gb: float | None, item_bytes: int, split: Any
) -> CasePersistentDataset:
    """The persistent dataset of ``data`` cached in ``folder``, refused first when it would not fit."""
    check_disk(folder, cache_max_gb, item_bytes, len(data), split)
    os.makedirs(folder, exist_ok=True)
    return CasePersistentDataset(data, transform, cache_dir=folder, hash_func=hash_with_file_stats)


def _check_build_options(cache: str, cache_rate: float, num_workers: int, cache_max_gb: float | None) -> None:
    """Refuse a bad caching option of :func:`build_dataset`, naming its value."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    if not 0.0 <= float(cache_rate) <= 1.0:
        raise ValueError(f"cache_rate must be in [0, 1], got {cache_rate}")
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if cache_max_gb is not None and float(cache_max_gb) <= 0:
        raise ValueError(f"cache_max_gb must be > 0 (or null for no bound), got {cache_max_gb}")


def _cache_settings(
    case_list: CaseList,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | None,
    reader: str,
    series: Any,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    with_label: bool,
) -> dict[str, Any]:
    """The preprocessing settings a persistent cache folder is named by (besides the table schema)."""
    return {
        "dataset": case_list.name,
        "modalities": [(m.name, m.kind, m.channels) for m in case_list.modalities],
        "multi_label": case_list.multi_label,
        "spatial_size": [int(s) for s in spatial_size],
        "pixdim": None if pixdim is None else list(pixdim),
        "reader": reader,
        "series": series,
        "mean": None if mean is None else [float(m) for m in mean],
        "std": None if std is None else [float(s) for s in std],
        "with_label": with_label,
    }


def _cache_bound(cache_max_gb: float, item_bytes: int, n: int, split: Any) -> int:
    """How many of ``n`` items fit in ``cache_max_gb``; said in the log when not all do."""
    fit = int(float(cache_max_gb) * 1e9 // item_bytes)
    if fit < n:
        logger.info(
            "cache of split %s: %d of %d items fit in cache_max_gb %g (%.2f MB each); the other %d are "
            "decoded at each access",
            split,
            fit,
            n,
            float(cache_max_gb),
            item_bytes / 1e6,
            n - fit,
        )
    return min(fit, n)


def split_dataset(
    split: str,
    settings: Mapping[str, Any],
    augment: Transform | None = None,
    cache: str | None = None,
) -> Dataset:
    """The dataset of one split, built with the settings every split shares.

    ``configs/train.json`` writes the shared settings once (``data_settings``) and each split's
    differences here: its name, the training augmentation, and a ``cache`` override (the multi-GPU
    overlay does not cache the test split on the ranks that do not test).

    Args:
        split: split name, e.g. ``"train"``.
        settings: :func:`build_dataset`'s ``case_list``, ``schema`` and keyword arguments.
        augment: the split's random transform (training only), or None.
        cache: replaces ``settings["cache"]`` when given.

    Raises:
        ValueError: ``settings`` has no ``case_list`` (the value names what it holds), or a setting
            :func:`build_dataset` rejects.

    Example:
        >>> shared = {"case_list": cases, "schema": None, "spatial_size": (64, 64), "cache": "none"}  # doctest: +SKIP
        >>> split_dataset("train", shared, augment=aug)  # doctest: +SKIP
    """
    kwargs = dict(settings)
    if "case_list" not in kwargs:
        raise ValueError(f"settings must hold case_list, got keys {sorted(kwargs)}")
    case_list, schema = kwargs.pop("case_list"), kwargs.pop("schema", None)
    if cache is not None:
        kwargs["cache"] = cache
    return build_dataset(case_list, split, schema, augment=augment, **kwargs)


def collate_cases(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack batch-contract items: tensors along a new dim 0, ``case_id`` as a list of strings.

    Tensors and arrays go through torch's ``default_collate`` (inside a loader worker it stacks into
    shared memory), as plain ``torch.Tensor``; other keys (if any) are kept as lists. Not MONAI's
    ``list_data_collate`` / ``default_collate`` on whole items: they return MetaTensors, fail on
    ``None`` values (a missing modality's path) and give no clear error for mismatched keys.

    Raises:
        ValueError: an empty batch, or items with different keys.
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    keys = list(batch[0].keys())
    for item in batch[1:]:
        if list(item.keys()) != keys:
            raise ValueError(f"batch items have different keys: {keys} vs {list(item.keys())}")
    out: dict[str, Any] = {}
    for k in keys:
        values = [item[k] for item in batch]
        if k == "case_id":
            out[k] = [str(v) for v in values]
        elif all(isinstance(v, torch.Tensor) for v in values):
            # plain tensors in, plain tensor out: a MetaTensor would carry per-item metadata into the batch
            out[k] = default_collate([v.as_subclass(torch.Tensor) for v in values])
        elif all(isinstance(v, np.ndarray) for v in values):
            out[k] = default_collate(values)
        else:
            out[k] = values
    return out


def build_dataloader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    distributed: bool = False,
    sampler: torch.utils.data.Sampler | None = None,
) -> DataLoader:
    """A ``monai.data.DataLoader`` over batch-contract items, seeded for a reproducible order.

    Args:
        dataset: e.g. from :func:`build_dataset`.
        batch_size: cases per batch (> 0), per process when distributed.
        shuffle: reshuffle every epoch (training).
        num_workers: loader worker processes.
        seed: seed of the shuffling (the same seed gives the same order).
        drop_last: drop the last incomplete batch.
        pin_memory: pin host memory (when feeding a GPU).
        distributed: give each process of the initialised ``torch.distributed`` group its own shard
            (``monai.data.DistributedSampler``; MONAI workflows call its ``set_epoch``).
        sampler: an explicit sampler instead (then ``shuffle`` is the sampler's business).

    Example:
        >>> loader = build_dataloader(build_dataset(cases, "train", schema, spatial_size=(224, 224)),
        ...                           batch_size=32, shuffle=True, seed=0)  # doctest: +SKIP
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(num_workers) < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if distributed and sampler is not None:
        raise ValueError("give either distributed=True or a sampler, not both")
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=int(seed))
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=int(num_workers),
        collate_fn=collate_cases,
        generator=generator,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=int(num_workers) > 0,
    )
