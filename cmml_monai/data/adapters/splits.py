"""Seeded, label-stratified train/valid/test splits for datasets without an official one.

Each case is one patient (ODIR-5K rows, MEN cases), so a case-level split is patient-level. The split
is saved as JSON (``case_id -> split``) and reused when the file exists, so reruns and every method
see the same split.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from cmml_monai.data.cases import SPLITS
from cmml_monai.data.errors import DataError
from cmml_monai.data.fingerprint import check_fingerprint, resolve_fingerprint_path
from cmml_monai.data.jsonio import atomic_write_json

__all__ = ["DEFAULT_FRACTIONS", "stratified_split", "load_or_make_split", "normalise_split_name"]

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "tr": "train",
    "valid": "valid",
    "val": "valid",
    "validation": "valid",
    "dev": "valid",
    "test": "test",
    "testing": "test",
    "te": "test",
}


def normalise_split_name(value: object) -> str | None:
    """``"Train"``, ``"val"``, ``"validation"`` ... -> ``"train"`` / ``"valid"`` / ``"test"``; None if unknown."""
    return _SPLIT_ALIASES.get(str(value).strip().lower())


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
        raise ValueError(f"split fractions must be 3 non-negative numbers (train > 0) summing to 1, got {fractions!r}")
    return fr  # type: ignore[return-value]


def stratified_split(
    case_ids: Sequence[str], keys: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, str]:
    """Assign each case to train/valid/test so that every stratum (key) is spread by ``fractions``.

    Cases are grouped by key (e.g. the label combination ``"10010000"``), shuffled within a group
    (seeded), laid out group after group, and each is given the split that is furthest below its
    quota so far. Consecutive members of a group therefore cycle through the splits in proportion.
    The result does not depend on the input order.

    Args:
        case_ids: unique case ids.
        keys: the stratum of each case.
        fractions: train, valid, test fractions.
        seed: random seed.

    Example:
        >>> stratified_split(["a", "b", "c", "d"], ["0", "0", "1", "1"], (0.5, 0.0, 0.5))  # doctest: +SKIP
    """
    fr = np.array(_check_fractions(fractions))
    if len(case_ids) != len(keys):
        raise ValueError(f"case_ids ({len(case_ids)}) and keys ({len(keys)}) differ in length")
    rng = np.random.default_rng(seed)
    order = sorted(zip(map(str, keys), map(str, case_ids)))
    groups: dict[str, list[str]] = {}
    for key, cid in order:
        groups.setdefault(key, []).append(cid)
    laid_out: list[str] = []
    for key in sorted(groups):
        members = groups[key]
        laid_out.extend(members[i] for i in rng.permutation(len(members)))
    # a random phase so that singleton strata do not all land in train
    assigned = np.zeros(3)
    phase = rng.random()
    out: dict[str, str] = {}
    for j, cid in enumerate(laid_out):
        deficit = fr * (j + 1 + phase) - assigned
        s = int(np.argmax(deficit))
        assigned[s] += 1
        out[cid] = SPLITS[s]
    return out


def load_or_make_split(
    case_ids: Sequence[str],
    keys: Sequence[str],
    split_file: str | os.PathLike | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    fingerprint: str | None = None,
    dataset: str | None = None,
) -> dict[str, str]:
    """Reuse ``split_file`` when it exists, else make a stratified split (and save it when a path is given).

    ``fingerprint`` (``cmml_monai.data.fingerprint.case_fingerprint`` of the dataset) replaces
    ``{fingerprint}`` in ``split_file``, is recorded in a new split file and must match the one an
    existing file records.

    Raises:
        DataError: the existing split file is unreadable, made for another dataset or does not cover
            every case.
    """
    if split_file is not None:
        split_file = resolve_fingerprint_path(split_file, fingerprint)
    if split_file is not None and os.path.isfile(split_file):
        path = os.fspath(split_file)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            mapping: Mapping[str, str] = data["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a valid split file ({e}); delete it to make a new split") from e
        check_fingerprint(path, data, fingerprint, "splits")
        absent = [c for c in case_ids if str(c) not in mapping]
        if absent:
            raise DataError(
                f"{path}: split file does not cover {len(absent)} case(s), e.g. {absent[0]!r}; "
                "delete it to make a new split"
            )
        out = {}
        for c in case_ids:
            name = normalise_split_name(mapping[str(c)])
            if name is None:
                raise DataError(f"{path}: case {c!r} has split {mapping[str(c)]!r}; use train, valid or test")
            out[str(c)] = name
        return out
    out = stratified_split(case_ids, keys, fractions, seed)
    if split_file is not None:
        data = {
            "seed": seed,
            "fractions": list(fractions),
            "dataset": dataset,
            "fingerprint": fingerprint,
            "splits": dict(sorted(out.items())),
        }
        atomic_write_json(split_file, data)
    return out
