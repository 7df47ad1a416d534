"""The datasets behind ``build_dataset``: MONAI's ``Dataset``, ``CacheDataset`` and ``PersistentDataset``
whose data errors surface as one-line ``DataError`` exceptions, and the keys and size bounds of their caches.

Example:
    >>> ds = CaseCacheDataset(data, transform, defer_errors=True)  # doctest: +SKIP
    >>> ds.load_errors  # index -> DataError of each bad item found while the cache filled
    {}
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from multiprocessing.pool import ThreadPool
from typing import Any

import numpy as np
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose
from monai.utils import optional_import

from cmml_monai.data.cases import CaseList
from cmml_monai.data.errors import DataError, find_data_error
from cmml_monai.data.transforms import TableEncoder

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "CaseDataset",
    "CaseCacheDataset",
    "CasePersistentDataset",
    "hash_with_file_stats",
    "settings_fingerprint",
    "item_nbytes",
    "check_disk",
]


class _PlainErrors:
    """Mixin: surface a DataError raised inside a transform as itself (one line for the user)
    instead of the nested RuntimeErrors that MONAI's ``Compose`` wraps it in."""

    def __getitem__(self, index: Any) -> Any:
        try:
            return super().__getitem__(index)  # type: ignore[misc]
        except RuntimeError as err:
            found = find_data_error(err)
            if found is None:
                raise
            raise found from None


class CaseDataset(_PlainErrors, Dataset):
    """``monai.data.Dataset`` whose data errors surface as ``DataError``."""


class CasePersistentDataset(_PlainErrors, PersistentDataset):
    """``monai.data.PersistentDataset`` whose data errors surface as ``DataError``."""


class _LoadFailure:
    """What the cache holds for an item whose cached transforms raised a ``DataError`` while deferred."""

    def __init__(self, error: DataError) -> None:
        self.error = error

    def __deepcopy__(self, memo: dict) -> _LoadFailure:
        # CacheDataset deep-copies a cached item before the random transforms; the marker is immutable
        return self


class _DeferringCompose(Compose):
    """``Compose`` that a :class:`CaseCacheDataset` fills its cache with.

    While ``deferring``, an input whose transforms raise a ``DataError`` gives a :class:`_LoadFailure`
    (cached in its place); a ``_LoadFailure`` passes through unchanged, so the random transforms after the
    cache never run on it. While ``filling``, the call after the cache (the only one not marked
    ``threading``: CacheDataset computes a cache item with ``threading=True``) returns its input, so
    filling the cache draws no random number.
    """

    def __init__(self, transform: Sequence[Callable] | Callable) -> None:
        if type(transform) is Compose:  # same transforms and settings; a Compose subclass stays one step
            super().__init__(
                transform.transforms,
                map_items=transform.map_items,
                unpack_items=transform.unpack_items,
                log_stats=transform.log_stats,
                lazy=transform.lazy,
                overrides=transform.overrides,
            )
        else:
            super().__init__(transform)
        self.deferring = False
        self.filling = False

    def __call__(
        self, input_: Any, start: int = 0, end: int | None = None, threading: bool = False, lazy: bool | None = None
    ) -> Any:
        if isinstance(input_, _LoadFailure) or (self.filling and not threading):
            return input_
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except Exception as err:
            found = find_data_error(err)
            if not (self.deferring and found is not None):
                raise
            return _LoadFailure(found)


class CaseCacheDataset(_PlainErrors, CacheDataset):
    """``monai.data.CacheDataset`` whose data errors surface as ``DataError``, also while the cache is
    filled (in the constructor), and whose items are shallow copies (a consumer adding or popping keys
    cannot change the cache; the tensors are shared, for read-only use).

    Same arguments as ``CacheDataset`` (but ``hash_as_key`` and ``runtime_cache``), plus ``defer_errors``:
    a bad item's ``DataError`` is recorded in ``load_errors`` (index -> error) while the cache fills
    instead of stopping the fill, so the preflight (:mod:`cmml_monai.data.preflight`) lists every bad file
    at once; such an item is decoded again when read, raising its error while the file is still bad.

    The cache is a list this class owns, given to ``CacheDataset`` as its public ``runtime_cache``
    container: MONAI computes each item into it (by its own rule for where the cached transforms stop)
    when the constructor reads every cached index once, and :meth:`reload` empties one entry to have
    MONAI compute it again. Only MONAI's public API is used.

    Example:
        >>> ds = CaseCacheDataset(data, transform, defer_errors=True)  # doctest: +SKIP
        >>> sorted(ds.load_errors)  # the indices of the items whose files are bad
        [0]
    """

    transform: _DeferringCompose
    runtime_cache: list[Any]

    def __init__(
        self,
        data: Sequence,
        transform: Sequence[Callable] | Callable,
        *args: Any,
        defer_errors: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("hash_as_key"):
            raise ValueError("CaseCacheDataset keys its cache by data index: hash_as_key is not supported")
        if kwargs.get("runtime_cache") not in (None, False):
            raise ValueError("CaseCacheDataset fills its own cache container: runtime_cache is not supported")
        self.defer_errors = bool(defer_errors)
        self.load_errors: dict[int, DataError] = {}
        kwargs["runtime_cache"] = []  # replaced by set_data: one entry per data item
        super().__init__(data, _DeferringCompose(transform), *args, **kwargs)

    def set_data(self, data: Sequence) -> None:
        """Replace the data and fill the cache again (``load_errors`` lists the new data's bad items)."""
        self.load_errors = {}
        self.runtime_cache = [None] * len(data)  # MONAI computes an item into an entry that is None
        super().set_data(data)
        self.transform.deferring = self.defer_errors
        try:
            _fill(self, range(self.cache_num))
        finally:
            self.transform.deferring = False

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (slice, Sequence)):  # a Subset, whose items come back through here
            return super().__getitem__(index)
        index = int(index)
        position = index + len(self) if index < 0 else index  # MONAI reads a negative index past cache_num wrong
        data = super().__getitem__(position)  # _PlainErrors: a DataError surfaces as itself
        if isinstance(data, _LoadFailure):
            # the fill deferred this item's error: decode it again (raising while its file is still bad)
            self.runtime_cache[position] = None
            data = super().__getitem__(position)
        return dict(data) if isinstance(data, dict) else data

    def reload(self, index: int) -> None:
        """Recompute the cached item ``index`` after its data dict changed (e.g. a modality marked missing).

        Raises:
            DataError: the item is still bad.
        """
        self.load_errors.pop(index, None)
        if index < self.cache_num:
            self.runtime_cache[index] = None
            _fill(self, [index])


def _path_stats(path: str) -> Any:
    """(size, mtime) of a file, or of each file of a DICOM folder; None when absent."""
    try:
        if os.path.isdir(path):
            return sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file())
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


def hash_with_file_stats(item: Mapping[str, Any]) -> bytes:
    """``PersistentDataset`` key of a data dict: its content plus the size and modification time of
    every image path in it, so a replaced or rewritten image is decoded again instead of served stale.

    Example:
        >>> key = hash_with_file_stats({"case_id": "1", "derm": "/data/1.jpg"})  # doctest: +SKIP
    """
    stats = {k: _path_stats(v) for k, v in item.items() if k != "case_id" and isinstance(v, str)}
    return pickle_hashing({"item": dict(item), "stats": stats})


def settings_fingerprint(settings: Mapping[str, Any], schema: TableEncoder | None) -> str:
    """Hash of everything that changes a cached item besides the data dict itself (16 hex digits).

    Example:
        >>> len(settings_fingerprint({"spatial_size": [64, 64]}, None))
        16
    """
    blob: dict[str, Any] = {"settings": dict(settings)}
    if schema is not None:
        to_json = getattr(schema, "to_json", None)
        blob["schema"] = to_json() if callable(to_json) else repr(schema)
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def item_nbytes(case_list: CaseList, spatial_size: Sequence[int]) -> int:
    """Bytes of one preprocessed item: the packed float32 image (every image channel at ``spatial_size``)
    and the table, whose shapes every item shares.

    Example:
        >>> item_nbytes(cases, (224, 224))  # doctest: +SKIP
        1204240
    """
    channels = sum(m.channels for m in case_list.image_modalities)
    voxels = int(np.prod([int(s) for s in spatial_size]))
    return 4 * (channels * voxels + len(case_list.table_columns or ()) + 1)


def check_disk(folder: str, cache_max_gb: float | None, item_bytes: int, n: int, split: Any) -> None:
    """Refuse a persistent cache that would exceed ``cache_max_gb`` or the free disk space, before writing.

    The items already in ``folder`` (a resumed run, another method on the same data) need no new space.

    Raises:
        DataError: the cache would not fit; the message says what to change.

    Example:
        >>> check_disk("outputs/cache/ab12", 10.0, 1_000_000, 500, "train")  # doctest: +SKIP
    """
    need_gb = item_bytes * n / 1e9
    if cache_max_gb is not None and need_gb > float(cache_max_gb):
        raise DataError(
            f"the persistent cache of split {split} needs about {need_gb:.2f} GB ({n} items), more than "
            f"cache_max_gb {float(cache_max_gb):g}: raise --cache_max_gb, or use --cache cache (bounded "
            "in memory) or --cache none"
        )
    written = sum(e.stat().st_size for e in os.scandir(folder) if e.is_file()) if os.path.isdir(folder) else 0
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free_gb = shutil.disk_usage(existing).free / 1e9
    if need_gb - written / 1e9 > free_gb:
        raise DataError(
            f"the persistent cache of split {split} needs about {need_gb:.2f} GB ({n} items) but {existing} has "
            f"{free_gb:.2f} GB free: free space, set --cache_dir elsewhere, or use --cache cache or --cache none"
        )


@contextmanager
def _filling(ds: CaseCacheDataset) -> Iterator[None]:
    """Items of ``ds`` read in this block are only computed into its cache (no random transform, no copy)."""
    copy_cache, ds.copy_cache = ds.copy_cache, False
    ds.transform.filling = True
    try:
        yield
    finally:
        ds.transform.filling, ds.copy_cache = False, copy_cache


def _fill(ds: CaseCacheDataset, indices: Sequence[int]) -> None:
    """Compute the cache entries ``indices`` of ``ds`` in a thread pool (MONAI computes an entry that is None
    when its index is read); record (while deferring) or raise a bad item's error."""
    if not indices:
        return
    if ds.progress and not has_tqdm:
        warnings.warn("tqdm is not installed, will not show the caching progress bar.")
    with _filling(ds), ThreadPool(ds.num_workers) as pool:  # _PlainErrors.__getitem__ unwraps a DataError
        results = pool.imap(super(CaseCacheDataset, ds).__getitem__, indices)
        if ds.progress and has_tqdm:
            results = tqdm(results, total=len(indices), desc="Loading dataset")
        for index, item in zip(indices, results):
            if isinstance(item, _LoadFailure):
                ds.load_errors[index] = item.error
