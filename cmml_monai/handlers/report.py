"""Side-by-side comparison of several runs' missing-rate sweeps (the paper's comparison / ablation tables)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

import numpy as np

__all__ = ["read_sweep", "comparison_table", "write_comparison"]


def read_sweep(path: str) -> list[dict]:
    """Rows of a ``sweep.csv`` (``method, rate, auc, acc, f1, n``) with numbers parsed.

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
    need = {"method", "rate", "auc", "acc", "f1", "n"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{path}: columns {sorted(rows[0])} lack {sorted(need - set(rows[0]))}")
    return [
        {"method": r["method"], "rate": float(r["rate"]), "auc": float(r["auc"]), "acc": float(r["acc"]),
         "f1": float(r["f1"]), "n": int(r["n"])}
        for r in rows
    ]


def comparison_table(rows: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """One row per method: ``AUC@rate`` columns, ``AVG AUC`` (mean over rates), then ``ACC@rate``, ``F1@rate``
    and their averages. Methods keep their first-seen order.

    Raises:
        ValueError: methods evaluated at different rates (their AVG AUCs would not be comparable).
    """
    methods = list(dict.fromkeys(r["method"] for r in rows))
    rates = sorted({r["rate"] for r in rows})
    table = []
    for m in methods:
        mine = {r["rate"]: r for r in rows if r["method"] == m}
        if sorted(mine) != rates:
            raise ValueError(f"method {m!r} was evaluated at rates {sorted(mine)}, the others at {rates}")
        row: dict = {"method": m}
        for key, label in (("auc", "AUC"), ("acc", "ACC"), ("f1", "F1")):
            for rate in rates:
                row[f"{label}@{rate:g}"] = mine[rate][key]
            row[f"AVG {label}"] = float(np.nanmean([mine[rate][key] for rate in rates]))
        table.append(row)
    columns = ["method"]
    for label in ("AUC", "ACC", "F1"):
        columns += [f"{label}@{rate:g}" for rate in rates] + [f"AVG {label}"]
    return columns, table


def write_comparison(rows: Sequence[dict], out_dir: str, name: str = "comparison") -> tuple[str, str]:
    """Write ``<name>.csv`` and ``<name>.md`` (best value per column in bold); returns both paths."""
    columns, table = comparison_table(rows)
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{name}.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in table:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    best = {c: max(r[c] for r in table) for c in columns[1:]} if table else {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [row["method"]]
        for c in columns[1:]:
            text = f"{row[c]:.4f}"
            cells.append(f"**{text}**" if len(table) > 1 and row[c] == best[c] else text)
        lines.append("| " + " | ".join(cells) + " |")
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path
