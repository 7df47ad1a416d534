"""Comparisons pooled over strata: several dataset draws, sites or folds, each compared on its own masks.

One ``scripts/compare.py`` output folder holds one stratum: every method trained on the same data
and masks, ``comparison.csv`` (each method's mean AVG AUC over its seeds) and
``comparison_paired.csv`` (each method minus the reference, seed by seed). A method that is ahead
by a fraction of a point in one stratum is inside that stratum's seed-to-seed noise; pooling the
strata answers "is it ahead on data of this kind" with every seed of every stratum behind it.

The pooled difference is the stratified mean: every stratum weighs the same, whatever its number
of seeds, and its variance is the sum of the strata's ``std^2 / pairs`` over ``k^2`` (strata are
independent draws). The interval is Student t with Welch-Satterthwaite degrees of freedom. The
inputs are the folders' CSVs, whose numbers carry four decimals; the reference is the one the
folders were compared against (``compare.py --reference`` when they were made), the same in all.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["read_comparison_folder", "pooled_comparison_table", "pooled_paired_table", "POOLED_PAIRED_COLUMNS"]

#: columns of ``pooled_paired_table``
POOLED_PAIRED_COLUMNS = (
    "method",
    "reference",
    "strata",
    "pairs",
    "AVG AUC diff",
    "CI low",
    "CI high",
    "df",
    "strata ahead",
    "p",
)


def _read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _number(row: dict, column: str, path: str) -> float:
    try:
        return float(row[column])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{path}: method {row.get('method')!r} has no number in column {column!r} "
            f"(got {row.get(column)!r}); is this a compare.py output?"
        ) from None


def read_comparison_folder(folder: str, name: str = "comparison") -> tuple[list[dict], list[dict]]:
    """The tables one ``compare.py --out FOLDER`` run wrote: ``(<name>.csv rows, <name>_paired.csv rows)``.

    Rows keep ``method`` and get the numeric columns the pooled tables use: ``AVG AUC`` for the
    comparison; ``reference``, ``pairs``, ``AVG AUC diff``, ``diff std`` for the paired one.

    Raises:
        FileNotFoundError: the folder or one of its two tables is missing (the paired table is only
            written when two methods share training seeds: train with ``compare.py --seeds``).
        ValueError: a table without the expected columns.
    """
    tables = []
    for stem, hint in (
        (name, "run scripts/compare.py --out FOLDER first"),
        (f"{name}_paired", "it needs runs of two methods with the same training seeds (--seeds)"),
    ):
        path = os.path.join(folder, f"{stem}.csv")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {stem}.csv in {folder}: {hint}")
        tables.append((path, _read_csv(path)))
    (cmp_path, cmp_rows), (pair_path, pair_rows) = tables
    comparison = [{"method": r["method"], "AVG AUC": _number(r, "AVG AUC", cmp_path)} for r in cmp_rows]
    paired = [
        {
            "method": r["method"],
            "reference": r.get("reference", ""),
            "pairs": int(_number(r, "pairs", pair_path)),
            "AVG AUC diff": _number(r, "AVG AUC diff", pair_path),
            "diff std": _number(r, "diff std", pair_path),
        }
        for r in pair_rows
    ]
    return comparison, paired


def pooled_comparison_table(strata: Mapping[str, Sequence[dict]]) -> tuple[list[str], list[dict]]:
    """Each method's AVG AUC per stratum, their mean over strata, and in how many strata it was the best.

    Args:
        strata: stratum label -> that stratum's comparison rows (``method``, ``AVG AUC``).

    Raises:
        ValueError: no strata, or a method missing from a stratum (a stratified mean needs every
            method in every stratum).
    """
    if not strata:
        raise ValueError("no strata to pool: give two or more compare.py output folders")
    labels = list(strata)
    per = {label: {r["method"]: r["AVG AUC"] for r in rows} for label, rows in strata.items()}
    methods = list(dict.fromkeys(m for label in labels for m in per[label]))
    for label in labels:
        missing = [m for m in methods if m not in per[label]]
        if missing:
            raise ValueError(f"stratum {label!r} has no runs of {missing}: pool strata where every method was run")
    best = {label: max(per[label].values()) for label in labels}
    columns = ["method", *[f"AVG AUC {label}" for label in labels], "mean over strata", "strata best"]
    table = []
    for m in methods:
        row = {"method": m, **{f"AVG AUC {label}": per[label][m] for label in labels}}
        row["mean over strata"] = float(np.mean([per[label][m] for label in labels]))
        row["strata best"] = sum(per[label][m] >= best[label] for label in labels)
        table.append(row)
    return columns, table


def _stratum_terms(
    per: Mapping[str, Mapping[str, dict]], method: str, reference: str
) -> tuple[list[float], list[float], list[int], int]:
    """Per stratum, ``method``'s mean difference, its variance of the mean and its degrees of freedom; and
    the pairs over all strata."""
    diffs, variances, dofs, pairs = [], [], [], 0
    for label, rows in per.items():
        if method not in rows:
            raise ValueError(
                f"stratum {label!r} has no seed-paired {method!r} - {reference!r}: "
                "pool strata where every method was run with the same seeds"
            )
        row = rows[method]
        if row["pairs"] < 2 or math.isnan(row["diff std"]):
            raise ValueError(
                f"stratum {label!r}, method {method!r}: {row['pairs']} seed pair(s); pooling needs "
                "at least 2 per stratum for its spread (train more --seeds)"
            )
        diffs.append(row["AVG AUC diff"])
        variances.append(row["diff std"] ** 2 / row["pairs"])
        dofs.append(row["pairs"] - 1)
        pairs += row["pairs"]
    return diffs, variances, dofs, pairs


def _pooled_row(
    method: str, reference: str, terms: tuple[list[float], list[float], list[int], int], confidence: float
) -> dict:
    """One row of :func:`pooled_paired_table`: the stratified mean and its Welch-Satterthwaite interval."""
    from scipy import stats

    diffs, variances, dofs, pairs = terms
    d, v, nu = np.asarray(diffs), np.asarray(variances), np.asarray(dofs, dtype=float)
    k = len(d)
    out = {
        "method": method,
        "reference": reference,
        "strata": k,
        "pairs": pairs,
        "AVG AUC diff": float(d.mean()),
        "CI low": float(d.mean()),
        "CI high": float(d.mean()),
        "df": math.nan,
        "strata ahead": int((d > 0).sum()),
        "p": math.nan,
    }
    if v.sum() > 0:
        se = math.sqrt(v.sum()) / k
        out["df"] = float(v.sum() ** 2 / (v**2 / nu).sum())
        half = stats.t.ppf(0.5 + confidence / 2, out["df"]) * se
        out["CI low"], out["CI high"] = float(d.mean() - half), float(d.mean() + half)
        out["p"] = float(2 * stats.t.sf(abs(d.mean()) / se, out["df"]))
    return out


def pooled_paired_table(strata: Mapping[str, Sequence[dict]], confidence: float = 0.95) -> tuple[list[str], list[dict]]:
    """Seed-paired differences pooled over strata (stratified mean, Welch-Satterthwaite t interval).

    For every method against the strata's common reference: ``strata``, ``pairs`` (all strata),
    ``AVG AUC diff`` (mean over strata of the stratum's mean difference), the ``confidence``
    interval, its degrees of freedom ``df``, ``strata ahead`` (strata whose mean difference is
    above 0) and ``p`` (two-sided t-test of the pooled difference; NaN when every stratum's
    differences are identical).

    Args:
        strata: stratum label -> that stratum's paired rows (``method``, ``reference``, ``pairs``,
            ``AVG AUC diff``, ``diff std``), as ``read_comparison_folder`` returns them.
        confidence: level of the interval, in (0, 1).

    Raises:
        ValueError: ``confidence`` outside (0, 1), no strata, strata measured against different
            references, a method missing from a stratum, or a stratum with fewer than two pairs
            (no spread to pool).

    Example::

        >>> strata = {d: read_comparison_folder(f"outputs/compare_{d}")[1] for d in ("a", "b", "c")}  # doctest: +SKIP
        >>> columns, table = pooled_paired_table(strata)  # doctest: +SKIP
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    if not strata:
        raise ValueError("no strata to pool: give two or more compare.py output folders")
    references = {r["reference"] for rows in strata.values() for r in rows}
    if len(references) > 1:
        raise ValueError(
            f"the strata were compared against different references {sorted(references)}: "
            "rerun compare.py with the same --reference in every folder"
        )
    per = {label: {r["method"]: r for r in rows if r["pairs"] > 0} for label, rows in strata.items()}
    methods = list(dict.fromkeys(m for rows in per.values() for m in rows))
    reference = next(iter(references), "")
    table = [_pooled_row(m, reference, _stratum_terms(per, m, reference), confidence) for m in methods]
    return list(POOLED_PAIRED_COLUMNS), table
