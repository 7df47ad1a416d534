"""Side-by-side comparison of several runs' missing-rate sweeps (comparison and ablation tables)."""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import is_float_dtype

from cmml_monai.data.jsonio import atomic_open

__all__ = [
    "read_sweep",
    "comparison_table",
    "write_comparison_table",
    "paired_table",
    "write_paired_table",
]

# (sweep.csv column, table label); a sweep.csv may lack the ece column
_METRICS = (("auc", "AUC"), ("acc", "ACC"), ("f1", "F1"), ("ece", "ECE"))
# table labels whose best value is the lowest
_LOWER_IS_BETTER = ("ECE",)
# columns a sweep.csv must have (ECE is optional: NaN when absent)
_REQUIRED = ("method", "rate", "auc", "acc", "f1", "n")
# columns that are not scores (never bold)
_PLAIN = ("runs", "AVG AUC std", "strata best")


def read_sweep(path: str, label: str | None = None) -> list[dict]:
    """Rows of a ``sweep.csv`` (``method, rate, auc, acc, f1, ece, n``; ``ece`` may be absent) with numbers parsed.

    Each row also gets ``run`` (the file it came from) and ``seed``: the training seed from the run's
    executed config (``config_executed.json`` next to the CSV, else in the output dir above
    ``sweep/`` or ``eval/``), None when there is none. With ``label`` the rows are renamed to that method
    name (e.g. an ablation trained with an override, whose sweep still says ``cmml``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing columns.
    """
    if os.path.isdir(path):
        for candidate in (
            os.path.join(path, "eval", "sweep.csv"),
            os.path.join(path, "sweep", "sweep.csv"),
            os.path.join(path, "sweep.csv"),
        ):
            if os.path.isfile(candidate):
                path = candidate
                break
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no sweep.csv at {path}: run train.json (or evaluate.json) for this output dir first")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = set(_REQUIRED)
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{path}: columns {sorted(rows[0])} lack {sorted(need - set(rows[0]))}")
    seed = _training_seed(path)
    return [
        {
            "method": label or r["method"],
            "rate": float(r["rate"]),
            **{key: float(r[key] if key in need else r.get(key) or "nan") for key, _ in _METRICS},
            "n": int(r["n"]),
            "run": path,
            "seed": seed,
        }
        for r in rows
    ]


def _training_seed(sweep_csv: str) -> int | None:
    """The ``seed`` of the run that wrote ``sweep_csv`` (from its executed config), None if unknown."""
    folder = os.path.dirname(os.path.abspath(sweep_csv))
    # the nearest config: next to the CSV, else in the output dir above sweep/ or eval/
    candidates = [os.path.join(folder, "config_executed.json")]
    if os.path.basename(folder) in ("sweep", "eval"):
        candidates.append(os.path.join(os.path.dirname(folder), "config_executed.json"))
    for config in candidates:
        if not os.path.isfile(config):
            continue
        try:
            with open(config, encoding="utf-8") as f:
                seed = json.load(f).get("seed")
        except (OSError, ValueError, AttributeError):
            return None  # an unreadable config pairs nothing rather than pairing wrongly
        return int(seed) if isinstance(seed, int) or (isinstance(seed, str) and seed.isdigit()) else None
    return None


def _sweep_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """``rows`` as a frame (``method, run, rate`` and the metrics, NaN where a row lacks one), in the order of
    ``_runs_by_method``: methods first-seen, a method's runs first-seen, a run's rows as given. The index
    is the row's position in ``rows``; ``run_order`` numbers the (method, run) pairs in that order.

    Raises:
        ValueError: one run giving a rate twice.
    """
    keys = [key for key, _ in _METRICS]
    frame = pd.DataFrame(list(rows)).reindex(columns=["method", "run", "rate", *keys])
    frame["run"] = frame["run"].fillna("").astype(str)
    frame[keys] = frame[keys].astype(float)
    twice = frame[frame.duplicated(["method", "run", "rate"])]
    if len(twice):
        first = twice.iloc[0]
        raise ValueError(f"method {first['method']!r}: rate {first['rate']:g} appears twice in run {first['run']!r}")
    frame = frame.iloc[np.argsort(pd.factorize(frame["method"])[0], kind="stable")]
    frame["run_order"] = frame.groupby(["method", "run"], sort=False).ngroup()
    return frame.sort_values("run_order", kind="stable")


def _nanmean(values: pd.Series) -> float:
    """NumPy's NaN-skipping mean, NaN (quietly) when all are NaN.

    NumPy's summation rather than pandas' compensated one: the floats the tables always had, so no
    four-decimal cell rounds the other way.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values.to_numpy(dtype=float)))


def _runs_by_method(rows: Sequence[dict]) -> dict[str, dict[str, dict[float, dict]]]:
    """``{method: {run: {rate: row}}}``, methods and runs in first-seen order.

    Raises:
        ValueError: one run giving a rate twice.
    """
    frame = _sweep_frame(rows)
    return {
        method: {run: {rows[i]["rate"]: rows[i] for i in group.index} for run, group in runs.groupby("run", sort=False)}
        for method, runs in frame.groupby("method", sort=False)
    }


def comparison_table(rows: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """One row per method: ``AUC@rate`` columns, ``AVG AUC`` (mean over rates), then ``ACC@rate``, ``F1@rate``,
    ``ECE@rate`` (expected calibration error; NaN for a sweep.csv without an ece column) and their
    averages, then ``runs`` and ``AVG AUC std``. Methods keep their first-seen order.

    Several runs of one method (rows with different ``run`` values, e.g. training seeds) are
    averaged: every column is the mean over the runs, ``AVG AUC std`` is the standard deviation of
    the runs' AVG AUCs (0 for one run).

    Raises:
        ValueError: methods (or runs) evaluated at different rates (their AVG AUCs would not be
            comparable), or one run giving a rate twice.
    """
    # runs in order and each run's rates ascending: the means add up in the order they always did
    frame = _sweep_frame(rows).sort_values(["run_order", "rate"], kind="stable")
    keys = [key for key, _ in _METRICS]
    rates = sorted(frame["rate"].unique().tolist())
    by_run = frame.groupby(["method", "run"], sort=False)
    for (m, run), got in by_run["rate"].agg(lambda s: sorted(s.tolist())).items():
        if got != rates:
            where = f" (run {run})" if run else ""
            raise ValueError(f"method {m!r}{where} was evaluated at rates {got}, the others at {rates}")
    methods = frame["method"].unique()
    # means skip NaN: an old sweep without ECE leaves its cells NaN and does not turn a method's average into NaN
    per_rate = frame.groupby(["method", "rate"], sort=False)[keys].agg(_nanmean).unstack("rate").reindex(methods)
    run_avg = by_run[keys].agg(_nanmean)
    averages = run_avg.groupby(level="method", sort=False).agg(_nanmean).reindex(methods)
    runs = frame.groupby("method", sort=False)["run"].nunique().reindex(methods)
    # np.std semantics: a run whose AVG AUC is NaN makes the spread NaN
    auc_std = run_avg["auc"].groupby(level="method", sort=False).agg(lambda s: s.std(ddof=1, skipna=False))
    columns = ["method"]
    table = pd.DataFrame({"method": methods}, index=methods)
    for key, label in _METRICS:
        for rate in rates:
            table[f"{label}@{rate:g}"] = per_rate[(key, rate)]
        table[f"AVG {label}"] = averages[key]
        columns += [f"{label}@{rate:g}" for rate in rates] + [f"AVG {label}"]
    table["runs"] = runs
    table["AVG AUC std"] = auc_std.reindex(methods).where(runs > 1, 0.0)
    columns += ["runs", "AVG AUC std"]
    return columns, table[columns].to_dict("records")


def _formatted(frame: pd.DataFrame) -> pd.DataFrame:
    """The cells of a table as text: floats with four decimals (NaN as ``nan``), everything else as it prints."""
    return pd.DataFrame(
        {c: frame[c].map("{:.4f}".format if is_float_dtype(frame[c]) else str) for c in frame},
        index=frame.index,
        columns=frame.columns,
        dtype=object,
    )


def _write_csv(frame: pd.DataFrame, path: str) -> None:
    """``frame`` as CSV at ``path`` (atomically): four-decimal numbers, NaN as ``nan``, CRLF line ends (``csv``'s)."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        frame.to_csv(f, index=False, float_format="%.4f", na_rep="nan", lineterminator="\r\n")


def _write_markdown(header: Sequence[str], cells: pd.DataFrame, path: str) -> None:
    """A Markdown table of text ``cells`` at ``path`` (atomically).

    Own writer: ``DataFrame.to_markdown`` needs ``tabulate`` (not a dependency) and pads the cells.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_comparison_table(
    columns: Sequence[str], table: Iterable[dict], out_dir: str, name: str = "comparison"
) -> tuple[str, str]:
    """Write a ``comparison_table`` as ``<name>.csv`` and ``<name>.md`` (best value per column in bold: lowest
    for ECE); returns both paths."""
    frame = pd.DataFrame(list(table), columns=list(columns))
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{name}.csv")
    _write_csv(frame, csv_path)
    cells = _formatted(frame)
    scored = [c for c in columns[1:] if c not in _PLAIN]
    if len(frame) > 1 and scored:
        lower = [c for c in scored if c.removeprefix("AVG ").split("@")[0] in _LOWER_IS_BETTER]
        best = frame[scored].max().astype(float)
        best[lower] = frame[lower].min()
        # NaN is never the best: it equals nothing
        bold = frame[scored].eq(best)
        cells[scored] = cells[scored].mask(bold, "**" + cells[scored] + "**")
    md_path = os.path.join(out_dir, f"{name}.md")
    _write_markdown(columns, cells, md_path)
    return csv_path, md_path


#: columns of the paired table (``paired_table``)
PAIRED_COLUMNS = (
    "method",
    "reference",
    "pairs",
    "seeds",
    "AVG AUC diff",
    "diff std",
    "CI low",
    "CI high",
    "ahead",
    "p",
)


_SeedRuns = dict[int, tuple[str, dict[float, dict]]]


def _runs_by_seed(grouped: Mapping[str, Mapping[str, dict[float, dict]]]) -> dict[str, _SeedRuns]:
    """method -> seed -> (run, {rate: row}); runs without a recorded seed are not paired."""
    runs: dict[str, _SeedRuns] = {m: {} for m in grouped}
    for m, method_runs in grouped.items():
        for run, per_rate in method_runs.items():
            seed = next(iter(per_rate.values())).get("seed")
            if seed is None:
                continue
            if seed in runs[m]:
                raise ValueError(
                    f"method {m!r} has two runs with seed {seed}: {runs[m][seed][0]} and {run}; "
                    "give one of them another label (LABEL=PATH)"
                )
            runs[m][seed] = (run, per_rate)
    return runs


def _seed_diffs(method_runs: _SeedRuns, reference_runs: _SeedRuns) -> tuple[list[int], list[float]]:
    """The seeds both ran and, per seed, the method's AVG AUC minus the reference's."""
    seeds = sorted(set(method_runs) & set(reference_runs))
    diffs = []
    for seed in seeds:
        (ref_run, ref), (run, other) = reference_runs[seed], method_runs[seed]
        if sorted(ref) != sorted(other) or any(ref[q]["n"] != other[q]["n"] for q in ref):
            raise ValueError(
                f"seed {seed}: {run} and {ref_run} were not evaluated on the same rates and cases; "
                "pair runs that share the masks (one --shared_dir)"
            )
        diffs.append(np.mean([other[q]["auc"] for q in other]) - np.mean([ref[q]["auc"] for q in ref]))
    return seeds, diffs


def _paired_row(method: str, reference: str, seeds: list[int], diffs: list[float], confidence: float) -> dict:
    """One row of :func:`paired_table`: the mean difference, its spread, interval and t-test."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    row: dict[str, Any] = {
        "method": method,
        "reference": reference,
        "pairs": len(d),
        "seeds": " ".join(map(str, seeds)),
        "AVG AUC diff": float(d.mean()) if len(d) else math.nan,
        "diff std": float(d.std(ddof=1)) if len(d) > 1 else math.nan,
        "CI low": math.nan,
        "CI high": math.nan,
        "ahead": int((d > 0).sum()),
        "p": math.nan,
    }
    if len(d) > 1:
        half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * row["diff std"] / math.sqrt(len(d))
        row["CI low"], row["CI high"] = float(row["AVG AUC diff"] - half), float(row["AVG AUC diff"] + half)
        if row["diff std"] > 0:
            row["p"] = float(stats.ttest_1samp(d, 0.0).pvalue)
    return row


def paired_table(
    rows: Sequence[dict], reference: str | None = None, confidence: float = 0.95
) -> tuple[list[str], list[dict]]:
    """Seed-paired AVG AUC differences of every method against ``reference``.

    Runs of two methods with the same training seed (``seed`` from ``read_sweep``) and the same
    masks are paired (why: docs/evaluation.md). For each other method: ``pairs`` (seeds run by both), ``AVG AUC
    diff`` (method minus reference, mean over the pairs), ``diff std``, the ``confidence`` interval
    of the mean difference (Student t; NaN with one pair), ``ahead`` (pairs where the method's AVG
    AUC is higher) and ``p`` (two-sided paired t-test; NaN with one pair or identical differences).
    Runs without a recorded seed, and methods with no seed in common with the reference, are left
    out (``pairs`` 0).

    Args:
        rows: rows of ``read_sweep`` (several methods, one run per method and seed).
        reference: the method the others are measured against (default: the first method).
        confidence: level of the interval, in (0, 1).

    Raises:
        ValueError: ``confidence`` outside (0, 1), an unknown ``reference``, a method with two runs of
            one seed, paired runs evaluated at different rates or on different numbers of cases.

    Example::

        >>> columns, table = paired_table(read_sweep("a/sweep/sweep.csv") + read_sweep("b/sweep/sweep.csv"))
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    grouped = _runs_by_method(rows)
    methods = list(grouped)
    reference = methods[0] if reference is None and methods else reference
    if reference not in methods:
        raise ValueError(f"reference method {reference!r} is not among the runs' methods {methods}")
    runs = _runs_by_seed(grouped)
    table = [
        _paired_row(m, reference, *_seed_diffs(runs[m], runs[reference]), confidence) for m in methods if m != reference
    ]
    return list(PAIRED_COLUMNS), table


def write_paired_table(
    columns: Sequence[str],
    table: Iterable[dict],
    out_dir: str,
    name: str = "comparison",
    confidence: float = 0.95,
) -> tuple[str, str]:
    """Write a ``paired_table`` made with ``confidence`` as ``<name>_paired.csv`` and ``<name>_paired.md``;
    returns both paths."""
    frame = pd.DataFrame(list(table), columns=list(columns))
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{name}_paired.csv")
    _write_csv(frame, csv_path)
    level = f"{confidence:.0%}"
    md_path = os.path.join(out_dir, f"{name}_paired.md")
    _write_markdown([c.replace("CI", f"{level} CI") for c in columns], _formatted(frame), md_path)
    return csv_path, md_path
