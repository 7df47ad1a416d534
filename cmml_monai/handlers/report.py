"""Side-by-side comparison of several runs' missing-rate sweeps (the paper's comparison / ablation tables)."""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["read_sweep", "comparison_table", "write_comparison"]

# (sweep.csv column, table label); ECE may be absent from sweeps written before it existed
_METRICS = (("auc", "AUC"), ("acc", "ACC"), ("f1", "F1"), ("ece", "ECE"))
# table labels whose best value is the lowest
_LOWER_IS_BETTER = ("ECE",)
# columns a sweep.csv must have (ECE is optional: NaN when absent)
_REQUIRED = ("method", "rate", "auc", "acc", "f1", "n")
# columns that are not scores (never bold)
_PLAIN = ("runs", "AVG AUC std")


def read_sweep(path: str, label: str | None = None) -> list[dict]:
    """Rows of a ``sweep.csv`` (``method, rate, auc, acc, f1, ece, n``; ``ece`` may be absent) with numbers parsed.

    Each row also gets ``run`` (the file it came from). With ``label`` the rows are renamed to that
    method name (e.g. an ablation trained with an override, whose sweep still says ``cmml``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: missing columns.
    """
    if os.path.isdir(path):
        for candidate in (os.path.join(path, "eval", "sweep.csv"), os.path.join(path, "sweep", "sweep.csv"),
                          os.path.join(path, "sweep.csv")):
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
    return [
        {"method": label or r["method"], "rate": float(r["rate"]),
         **{key: float(r[key] if key in need else r.get(key) or "nan") for key, _ in _METRICS},
         "n": int(r["n"]), "run": path}
        for r in rows
    ]


def comparison_table(rows: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """One row per method: ``AUC@rate`` columns, ``AVG AUC`` (mean over rates), then ``ACC@rate``, ``F1@rate``,
    ``ECE@rate`` (expected calibration error; NaN for sweeps written before it existed) and their
    averages, then ``runs`` and ``AVG AUC std``. Methods keep their first-seen order.

    Several runs of one method (rows with different ``run`` values, e.g. training seeds) are
    averaged: every column is the mean over the runs, ``AVG AUC std`` is the standard deviation of
    the runs' AVG AUCs (0 for one run).

    Raises:
        ValueError: methods (or runs) evaluated at different rates (their AVG AUCs would not be
            comparable), or one run giving a rate twice.
    """
    methods = list(dict.fromkeys(r["method"] for r in rows))
    rates = sorted({r["rate"] for r in rows})
    table = []
    for m in methods:
        runs: dict[str, dict[float, dict]] = {}
        for r in rows:
            if r["method"] != m:
                continue
            per_rate = runs.setdefault(str(r.get("run", "")), {})
            if r["rate"] in per_rate:
                raise ValueError(f"method {m!r}: rate {r['rate']:g} appears twice in run {r.get('run', '')!r}")
            per_rate[r["rate"]] = r
        for run, per_rate in runs.items():
            if sorted(per_rate) != rates:
                where = f" (run {run})" if run else ""
                raise ValueError(
                    f"method {m!r}{where} was evaluated at rates {sorted(per_rate)}, the others at {rates}"
                )
        row: dict = {"method": m}
        for key, label in _METRICS:
            values = np.array(
                [[per_rate[rate].get(key, np.nan) for rate in rates] for per_rate in runs.values()], dtype=float
            )
            with warnings.catch_warnings():  # an all-NaN column (old sweeps without ECE) stays NaN, quietly
                warnings.simplefilter("ignore", RuntimeWarning)
                for j, rate in enumerate(rates):
                    row[f"{label}@{rate:g}"] = float(np.nanmean(values[:, j]))
                averages = np.nanmean(values, axis=1)
                # runs without the column (ECE of an old sweep) do not turn the method's average into NaN
                row[f"AVG {label}"] = float(np.nanmean(averages))
            if key == "auc":
                auc_std = float(np.std(averages, ddof=1)) if len(averages) > 1 else 0.0
        row["runs"] = len(runs)
        row["AVG AUC std"] = auc_std
        table.append(row)
    columns = ["method"]
    for _, label in _METRICS:
        columns += [f"{label}@{rate:g}" for rate in rates] + [f"AVG {label}"]
    columns += ["runs", "AVG AUC std"]
    return columns, table


def write_comparison(rows: Sequence[dict], out_dir: str, name: str = "comparison") -> tuple[str, str]:
    """Write ``<name>.csv`` and ``<name>.md`` (best value per column in bold: lowest for ECE); returns both paths."""
    columns, table = comparison_table(rows)
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{name}.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in table:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    scored = [c for c in columns[1:] if c not in _PLAIN]
    best = {}
    for c in scored:
        values = [r[c] for r in table if not math.isnan(r[c])]
        if values:
            lower = c.removeprefix("AVG ").split("@")[0] in _LOWER_IS_BETTER
            best[c] = min(values) if lower else max(values)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [row["method"]]
        for c in columns[1:]:
            text = str(row[c]) if isinstance(row[c], int) else f"{row[c]:.4f}"
            cells.append(f"**{text}**" if c in best and len(table) > 1 and row[c] == best[c] else text)
        lines.append("| " + " | ".join(cells) + " |")
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path
