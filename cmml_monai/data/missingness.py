"""Missing-modality masks: natural presence, simulated missingness, fixed subsets, saving and applying.

Presence masks are ``[N, k]`` bool arrays in ``CaseList.modalities`` order (image modalities, then the
table last when the dataset has one); True = present. A simulated mask only removes modalities that
are naturally present and always keeps at least one. Masks are seeded and saved per split as JSON so
that every method is evaluated on exactly the same masks.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from cmml_monai.data.cases import Case, CaseList
from cmml_monai.data.errors import DataError
from cmml_monai.data.fingerprint import check_fingerprint, fingerprint_of, resolve_fingerprint_path
from cmml_monai.data.jsonio import atomic_write_json

if TYPE_CHECKING:  # torch is imported where it is used, so mask files and reports load fast
    import torch

__all__ = [
    "DEFAULT_RATES",
    "rate_key",
    "natural_presence",
    "simulate_presence",
    "fixed_subset_presence",
    "all_subsets",
    "apply_presence_mask",
    "save_masks",
    "ensure_masks",
    "ensure_split_masks",
]

DEFAULT_RATES: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7)
_MASK_VERSION = 1


def rate_key(rate: float) -> str:
    """The string key of a missing rate in mask files, e.g. ``0.3 -> "0.3"``."""
    return repr(float(rate))


def _check_natural(natural: Any) -> np.ndarray:
    arr = np.asarray(natural)
    if arr.ndim != 2:
        raise ValueError(f"natural presence must be a [N, k] array, got shape {arr.shape}")
    return arr.astype(bool)


def natural_presence(case_list: CaseList, cases: Sequence[Case] | None = None) -> np.ndarray:
    """Natural presence ``[N, k]`` of ``cases`` (default: all cases of ``case_list``).

    Example:
        >>> natural = natural_presence(case_list, case_list.split("test"))  # doctest: +SKIP
    """
    cases = case_list.cases if cases is None else cases
    k = len(case_list.modalities)
    if not cases:
        return np.zeros((0, k), dtype=bool)
    return np.array([case_list.present(c) for c in cases], dtype=bool).reshape(len(cases), k)


def simulate_presence(natural: np.ndarray, rate: float, seed: int = 0) -> np.ndarray:
    """Drop each naturally present modality independently with probability ``rate``, keeping at least one.

    When every present modality of a case is dropped, one of its present modalities is kept, chosen at
    random. One uniform draw per cell decides the drop (``u < rate``), so for a fixed seed the masks of
    increasing rates are nested: what is missing at 0.3 is also missing at 0.5.

    Args:
        natural: ``[N, k]`` bool natural presence.
        rate: drop probability in ``[0, 1]``.
        seed: random seed; the same seed gives the same mask.

    Raises:
        ValueError: bad ``rate``, bad shape, or a case with no modality at all.
    """
    natural = _check_natural(natural)
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"missing rate must be in [0, 1], got {rate!r}")
    empty = np.flatnonzero(~natural.any(axis=1))
    if empty.size:
        raise ValueError(f"rows {empty[:5].tolist()} have no modality at all; drop such cases before simulating")
    rng = np.random.default_rng(seed)
    u = rng.random(natural.shape)
    out = natural & (u >= float(rate))
    none_left = ~out.any(axis=1)
    if none_left.any():
        # keep the present modality with the largest draw: a uniformly random one, and the last one to
        # go as the rate grows, so masks stay nested across rates
        score = np.where(natural, u, -1.0)
        keep = score.argmax(axis=1)
        rows = np.flatnonzero(none_left)
        out[rows, keep[rows]] = True
    return out


def fixed_subset_presence(natural: np.ndarray, subset_mask: Sequence[bool] | np.ndarray) -> np.ndarray:
    """Keep only the modalities in ``subset_mask`` (``[k]`` bool): ``natural & subset_mask``.

    Rows that end up with no modality are all False; evaluation excludes them (``mask.any(1)``).
    """
    natural = _check_natural(natural)
    subset = np.asarray(subset_mask, dtype=bool).reshape(-1)
    if subset.shape[0] != natural.shape[1]:
        raise ValueError(f"subset_mask has {subset.shape[0]} entries, expected k={natural.shape[1]}")
    if not subset.any():
        raise ValueError("subset_mask selects no modality; a case needs at least one")
    return natural & subset[None, :]


def all_subsets(k: int) -> list[tuple[bool, ...]]:
    """Every non-empty subset of ``k`` modalities as a bool tuple, largest first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    subsets = [tuple(bool(i >> j & 1) for j in range(k)) for i in range(1, 2**k)]
    return sorted(subsets, key=lambda s: (-sum(s), [not x for x in s]))


def apply_presence_mask(
    image: torch.Tensor,
    tabular: torch.Tensor | None,
    present: torch.Tensor | np.ndarray,
    channels_per_modality: int | Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Write NaN into the channels / table of absent modalities (returns masked copies).

    Args:
        image: ``[B, sum(C_i), *spatial]``; image modality i owns its consecutive channel block.
        tabular: ``[B, F]`` or None.
        present: ``[B, k]`` bool; k = image modalities (+1 for the table, which is last). With
            ``tabular=None`` a table column, if given, is ignored.
        channels_per_modality: channels of each image modality (one int for all, or one per modality).

    Returns:
        ``(image, tabular)`` copies with NaN where the modality is absent; ``tabular`` stays None if None.

    Example:
        >>> img, tab = apply_presence_mask(batch["image"], batch["tabular"], present, 3)  # doctest: +SKIP
    """
    import torch

    if image.ndim < 2:
        raise ValueError(f"image must be [B, C, ...], got shape {tuple(image.shape)}")
    if isinstance(channels_per_modality, int):
        if channels_per_modality < 1 or image.shape[1] % channels_per_modality:
            raise ValueError(
                f"channels_per_modality={channels_per_modality} does not divide the {image.shape[1]} image channels"
            )
        channels = [channels_per_modality] * (image.shape[1] // channels_per_modality)
    else:
        channels = [int(c) for c in channels_per_modality]
        if sum(channels) != image.shape[1] or any(c < 1 for c in channels):
            raise ValueError(f"channels_per_modality={channels} does not match the {image.shape[1]} image channels")
    m = len(channels)
    present_t = torch.as_tensor(present, device=image.device).bool()
    if present_t.ndim != 2 or present_t.shape[0] != image.shape[0] or present_t.shape[1] not in (m, m + 1):
        raise ValueError(f"present must be [B={image.shape[0]}, k={m} or {m + 1}], got shape {tuple(present_t.shape)}")
    if tabular is not None and present_t.shape[1] != m + 1:
        raise ValueError(f"present has {present_t.shape[1]} columns but a table is given: expected {m + 1}")
    reps = torch.as_tensor(channels, device=image.device)
    chan = torch.repeat_interleave(present_t[:, :m], reps, dim=1)  # [B, sum(C)]
    chan = chan.reshape(*chan.shape, *([1] * (image.ndim - 2)))
    nan = torch.tensor(float("nan"), dtype=image.dtype, device=image.device)
    image_out = torch.where(chan, image, nan)
    tab_out = None
    if tabular is not None:
        nan_t = torch.tensor(float("nan"), dtype=tabular.dtype, device=tabular.device)
        tab_out = torch.where(present_t[:, m:].to(tabular.device), tabular, nan_t)
    return image_out, tab_out


def save_masks(
    path: str | os.PathLike,
    case_ids: Sequence[str],
    modality_names: Sequence[str],
    masks: Mapping[Any, np.ndarray],
    seed: int | None = None,
    fingerprint: str | None = None,
    dataset: str | None = None,
) -> None:
    """Save presence masks of one split as JSON: one ``"0101"``-style string per case and rate.

    Args:
        path: the JSON file (written atomically).
        case_ids: case ids in row order.
        modality_names: modality names in column order.
        masks: rate -> ``[N, k]`` bool mask.
        seed: the seed that made the masks (recorded, checked by ``ensure_masks``).
        fingerprint, dataset: the case fingerprint and kind of the dataset the masks are for
            (``cmml_monai.data.fingerprint``; recorded, checked on load).
    """
    n, k = len(case_ids), len(modality_names)
    out: dict[str, list[str]] = {}
    for rate, mask in masks.items():
        arr = np.asarray(mask, dtype=bool)
        if arr.shape != (n, k):
            raise ValueError(f"mask for rate {rate} has shape {arr.shape}, expected ({n}, {k})")
        out[rate_key(float(rate))] = ["".join("1" if x else "0" for x in row) for row in arr]
    data = {
        "version": _MASK_VERSION,
        "seed": seed,
        "dataset": dataset,
        "fingerprint": fingerprint,
        "modalities": list(modality_names),
        "case_ids": [str(c) for c in case_ids],
        "masks": out,
    }
    atomic_write_json(os.fspath(path), data)


def _read_mask_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise DataError(f"mask file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("version") != _MASK_VERSION or not isinstance(data.get("masks"), dict):
            raise ValueError("unexpected content")
        data["case_ids"] = [str(c) for c in data["case_ids"]]
        data["modalities"] = [str(m) for m in data["modalities"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a valid mask file ({e}); delete it to regenerate the masks") from e
    return data


def _verify(
    path: str,
    data: Mapping[str, Any],
    case_ids: Sequence[str] | None,
    modality_names: Sequence[str] | None,
    fingerprint: str | None = None,
):
    check_fingerprint(path, data, fingerprint, "masks")
    if modality_names is not None and list(modality_names) != data["modalities"]:
        raise DataError(
            f"{path}: masks were made for modalities {data['modalities']}, not {list(modality_names)}; "
            "give this dataset its own folder (--shared_dir DIR, or leave shared_dir at its default)"
        )
    if case_ids is not None and [str(c) for c in case_ids] != data["case_ids"]:
        raise DataError(
            f"{path}: masks were made for other cases ({len(data['case_ids'])} ids, now {len(case_ids)}) "
            "or in another order; give this dataset its own folder (--shared_dir DIR, or leave shared_dir at its "
            "default, which is keyed to the cases and their split)"
        )


def _decode(path: str, data: Mapping[str, Any]) -> dict[float, np.ndarray]:
    n, k = len(data["case_ids"]), len(data["modalities"])
    out: dict[float, np.ndarray] = {}
    for key, rows in data["masks"].items():
        try:
            arr = np.array([[ch == "1" for ch in row] for row in rows], dtype=bool).reshape(n, k)
            if any(len(row) != k or set(row) - {"0", "1"} for row in rows):
                raise ValueError("rows must be strings of 0/1")
            out[float(key)] = arr
        except ValueError as e:
            raise DataError(f"{path}: masks for rate {key!r} are malformed ({e}); delete the file to regenerate") from e
    return out


def ensure_masks(
    path: str | os.PathLike,
    case_ids: Sequence[str],
    modality_names: Sequence[str],
    natural: np.ndarray,
    rates: Sequence[float] = DEFAULT_RATES,
    seed: int = 0,
    fingerprint: str | None = None,
    dataset: str | None = None,
) -> dict[float, np.ndarray]:
    """Load the masks of a split if the file exists, else simulate and save them.

    Every method calls this with the same path, so all are evaluated on the same masks. With
    ``fingerprint`` (the dataset's case fingerprint) the file records it and a file made for another
    dataset stops the run.

    Raises:
        DataError: the existing file was made for another dataset, other cases, modalities, seed or
            rates, or it marks present a modality that is naturally missing.
    """
    path = os.fspath(path)
    natural = _check_natural(natural)
    if natural.shape != (len(case_ids), len(modality_names)):
        raise ValueError(f"natural has shape {natural.shape}, expected ({len(case_ids)}, {len(modality_names)})")
    if os.path.isfile(path):
        data = _read_mask_file(path)
        _verify(path, data, case_ids, modality_names, fingerprint)
        if data.get("seed") is not None and data["seed"] != seed:
            raise DataError(
                f"{path}: masks were made with seed {data['seed']}, not {seed}; keep mask_seed "
                f"at {data['seed']} or give these masks their own folder (--shared_dir DIR)"
            )
        masks = _decode(path, data)
        absent = [r for r in rates if float(r) not in masks]
        if absent:
            raise DataError(
                f"{path}: no masks for rates {absent}; give these rates their own folder (--shared_dir DIR)"
            )
        for r in rates:
            if (masks[float(r)] & ~natural).any():
                raise DataError(f"{path}: masks for rate {r} mark naturally missing inputs present; delete it")
        return {float(r): masks[float(r)] for r in rates}
    masks = {float(r): simulate_presence(natural, float(r), seed) for r in rates}
    save_masks(path, case_ids, modality_names, masks, seed=seed, fingerprint=fingerprint, dataset=dataset)
    return masks


def ensure_split_masks(
    case_list: CaseList,
    split: str,
    n_items: int,
    masks_dir: str | os.PathLike,
    rates: Sequence[float] = DEFAULT_RATES,
    seed: int = 0,
) -> tuple[list[str], np.ndarray, dict[float, np.ndarray]]:
    """``ensure_masks`` for one split of a case list, saved as ``<masks_dir>/masks_<split>.json``.

    Args:
        case_list: the dataset's cases.
        split: the split whose masks are made or reused.
        n_items: items in the split's dataset, which must be in ``case_list.split(split)`` order.
        masks_dir: the shared folder (one per dataset, so every method uses the same masks);
            ``{fingerprint}`` in it becomes the case list's fingerprint (``cmml_monai.data.fingerprint``).
        rates: missing rates.
        seed: mask seed.

    Returns:
        ``(case ids in split order, natural presence [N, k], rate -> presence [N, k])``.

    Raises:
        ValueError: the dataset and the split differ in length.
        DataError: the folder holds masks of another dataset.
    """
    cases = case_list.split(split)
    if n_items != len(cases):
        raise ValueError(f"the {split} dataset has {n_items} items but the case list {len(cases)}")
    case_ids = [c.case_id for c in cases]
    natural = natural_presence(case_list, cases)
    fingerprint = fingerprint_of(case_list)
    path = os.path.join(resolve_fingerprint_path(masks_dir, fingerprint), f"masks_{split}.json")
    masks = ensure_masks(path, case_ids, case_list.modality_names, natural, rates, seed, fingerprint, case_list.name)
    return case_ids, natural, masks
