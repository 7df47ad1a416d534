"""Dataset summary: counts of cases, splits, labels, missing inputs and table columns.

Used by ``scripts/inspect_data.py`` and logged to MLflow by ``log_run_inputs``. Only counts and column
names are reported, never case ids or values, so the summary is safe to share.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmml_monai.data.cases import SPLITS, Case, CaseList
from cmml_monai.data.missingness import natural_presence
from cmml_monai.data.table import TableSchema, is_empty_cell

__all__ = ["summarize", "format_summary"]


def summarize(case_list: CaseList) -> dict[str, Any]:
    """Counts describing ``case_list``.

    Returns:
        A JSON-ready dict with ``name``, ``n_cases``, ``splits`` (split -> count), ``label_counts``
        (label -> cases with it), ``missing`` (modality -> cases without it), ``by_split`` (split ->
        ``cases``, ``label_counts``, ``missing`` of that split), ``missing_reasons`` (modality -> reason
        -> count), ``dropped`` (count), ``dropped_reasons`` (reason -> count), ``modalities`` and
        ``table_columns`` (name, type, whether the type was inferred, missing rate).

    Example:
        >>> summarize(load_dataset("men", "/data/MEN"))["missing"]  # doctest: +SKIP
        {'t1c': 3, 't1n': 10, 't2w': 0, 't2f': 2, 'table': 0}
    """
    cases = case_list.cases
    split_counts = Counter(c.split for c in cases)
    splits = {s: int(split_counts.get(s, 0)) for s in SPLITS}
    splits.update({s: int(n) for s, n in split_counts.items() if s not in SPLITS})
    present = natural_presence(case_list)
    names = case_list.modality_names
    by_split = {}
    for s in splits:
        rows = [i for i, c in enumerate(cases) if c.split == s]
        by_split[s] = {
            "cases": len(rows),
            "label_counts": _label_counts(case_list, [cases[i] for i in rows]),
            "missing": _missing(names, present[rows]),
        }
    return {
        "name": case_list.name,
        "n_cases": len(cases),
        "multi_label": case_list.multi_label,
        "splits": splits,
        "label_counts": _label_counts(case_list, cases),
        "modalities": [{"name": m.name, "kind": m.kind, "channels": m.channels} for m in case_list.modalities],
        "missing": _missing(names, present),
        "by_split": by_split,
        "missing_reasons": _missing_reasons(case_list, present),
        "dropped": len(case_list.dropped),
        "dropped_reasons": dict(sorted(Counter(r for _, r in case_list.dropped).items())),
        "table_columns": _table_columns(case_list),
        "all_present": int(present.all(axis=1).sum()) if len(cases) else 0,
    }


def _missing_reasons(case_list: CaseList, present: np.ndarray) -> dict[str, dict[str, int]]:
    """Modality -> why it is missing -> cases."""
    reasons: dict[str, dict[str, int]] = {}
    for j, m in enumerate(case_list.modalities):
        counter: Counter[str] = Counter()
        for i, c in enumerate(case_list.cases):
            if not present[i, j]:
                counter[c.missing_reason.get(m.name, "empty" if m.kind == "table" else "unknown")] += 1
        if counter:
            reasons[m.name] = dict(sorted(counter.items()))
    return reasons


def _table_columns(case_list: CaseList) -> list[dict[str, Any]]:
    """Per clinical column: its type as the train split gives it, whether inferred, categories, missing rate."""
    if not case_list.table_columns:
        return []
    cases = case_list.cases
    train = case_list.split("train") or cases
    declared = {k: v for k, v in case_list.table_types.items() if k in case_list.table_columns}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema = TableSchema.fit([c.table for c in train], case_list.table_columns, declared)  # type: ignore[arg-type]
    columns = []
    for spec in schema.columns:
        n_empty = sum(is_empty_cell(c.table.get(spec.name)) for c in cases)
        columns.append(
            {
                "name": spec.name,
                "type": spec.type,
                "inferred": spec.inferred,
                "categories": len(spec.vocabulary) if spec.type == "categorical" else None,
                "missing_rate": round(float(n_empty / len(cases)), 4) if cases else 0.0,
            }
        )
    return columns


def _label_counts(case_list: CaseList, cases: Sequence[Case]) -> dict[str, int]:
    """Class (label) name -> cases with it."""
    if case_list.multi_label:
        return {
            n: int(sum(int(c.label[j]) for c in cases))  # type: ignore[index]
            for j, n in enumerate(case_list.class_names)
        }
    return {n: int(sum(c.label == j for c in cases)) for j, n in enumerate(case_list.class_names)}


def _missing(names: Sequence[str], present: np.ndarray) -> dict[str, int]:
    """Modality name -> rows of ``present`` (``[N, k]``) without it."""
    return {m: int((~present[:, j]).sum()) for j, m in enumerate(names)}


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable text of ``summarize``'s output."""
    lines = [
        f"dataset {summary['name']}: {summary['n_cases']} cases"
        + (" (multi-label)" if summary.get("multi_label") else "")
    ]
    lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()))
    lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in summary["label_counts"].items()))
    lines.append(f"cases with every modality present: {summary['all_present']}")
    lines.append("missing per modality:")
    n = max(summary["n_cases"], 1)
    for m, count in summary["missing"].items():
        why = summary["missing_reasons"].get(m, {})
        detail = f" ({', '.join(f'{r}: {c}' for r, c in why.items())})" if why else ""
        lines.append(f"  {m:<10} {count:>6} ({100 * count / n:5.1f}%){detail}")
    dropped = summary["dropped"]
    detail = ", ".join(f"{r}: {c}" for r, c in summary["dropped_reasons"].items())
    lines.append(f"dropped cases: {dropped}" + (f" ({detail})" if detail else ""))
    if summary["table_columns"]:
        lines.append("table columns:")
        for c in summary["table_columns"]:
            kind = c["type"] + (" (inferred)" if c["inferred"] else "")
            if c["categories"] is not None:
                kind += f", {c['categories']} categories"
            lines.append(f"  {c['name']:<32} {kind:<40} missing {100 * c['missing_rate']:5.1f}%")
    else:
        lines.append("table columns: none")
    return "\n".join(lines)
