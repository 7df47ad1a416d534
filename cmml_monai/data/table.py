"""The clinical table: reading CSV/XLSX files and encoding rows into a float feature vector.

``TableSchema`` is fitted on the **train split only** (numeric: mean/std, categorical: sorted
vocabulary), encodes one row into ``float32[F]`` (numbers standardised, categories as codes stored as
floats, NaN for an empty cell or an unseen category) and round-trips through a JSON file that is
saved beside the model and reused at inference.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from cmml_monai.data.errors import DataError
from cmml_monai.data.jsonio import atomic_write_json

__all__ = ["ColumnType", "ColumnSpec", "TableSchema", "read_table", "is_empty_cell", "normalise_category"]

ColumnType = Literal["numeric", "categorical"]
_SCHEMA_VERSION = 1


def is_empty_cell(value: Any) -> bool:
    """True for ``None``, NaN, ``pandas.NA`` / ``NaT`` and blank strings."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # array-like values are not cells
        return False


def normalise_category(value: Any) -> str:
    """Canonical string of a categorical cell, so ``1``, ``1.0`` and ``" 1 "`` are the same category."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _to_float(value: Any) -> float | None:
    """The cell as a float, or None when it is not a number."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    try:
        out = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def read_table(path: str | os.PathLike, sheet: str | int | None = None, required: Sequence[str] = ()) -> pd.DataFrame:
    """Read a clinical table from CSV or XLSX and check its required columns.

    Column names are stripped of surrounding spaces. Empty cells become NaN.

    Args:
        path: ``.csv``, ``.tsv``, ``.xlsx`` or ``.xls`` file.
        sheet: sheet name or index for Excel files (default: the first sheet).
        required: columns that must exist.

    Raises:
        DataError: the file is missing or unreadable, the sheet is absent, or a required column is absent.

    Example:
        >>> df = read_table("meta/meta.csv", required=["case_num", "diagnosis"])  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"table file not found: {path}; check the path (or the dataset_dir option)")
    try:
        df, sheets, sheet = _parse_table(path, sheet)
    except DataError:
        raise
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except Exception as e:  # a parser's traceback is not actionable; name the file instead
        raise DataError(f"{path}: cannot read the table ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column {missing[0]!r}"
            f"{' (and ' + str(missing[1:]) + ')' if len(missing) > 1 else ''}; found columns {list(df.columns)}"
            + (f" in sheet {sheet!r} of sheets {sheets}: set the sheet option" if len(sheets) > 1 else "")
        )
    return df


def _parse_table(path: str, sheet: str | int | None) -> tuple[pd.DataFrame, list[str], str | int | None]:
    """(the table, the workbook's sheet names or [], the sheet read) of a CSV/TSV or Excel file."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".xlsx", ".xlsm", ".xls"):
        xls = pd.ExcelFile(path)
        if sheet is None:
            sheet = 0
        elif isinstance(sheet, str) and sheet not in xls.sheet_names:
            raise DataError(f"{path}: sheet {sheet!r} not found (sheets: {xls.sheet_names}); set the sheet option")
        return xls.parse(sheet), list(xls.sheet_names), sheet
    if ext in (".csv", ".tsv", ".txt"):
        # utf-8-sig: CSVs saved by Excel start with a byte-order mark that would stick to the first column
        df = pd.read_csv(path, sep="\t" if ext == ".tsv" else ",", encoding="utf-8-sig")
        if ext != ".tsv" and len(df.columns) == 1 and ";" in str(df.columns[0]):
            # a European-locale Excel export: ';' between cells, ',' as the decimal mark
            df = pd.read_csv(path, sep=";", decimal=",", encoding="utf-8-sig")
        return df, [], sheet
    raise DataError(f"{path}: unsupported table format {ext!r}; use .csv or .xlsx")


def _not_utf8(path: str) -> DataError:
    """The error for a table that is not UTF-8, naming the first bad byte and its line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:  # the parser's offset is within a chunk: find the first bad byte in the whole file
        raw.decode("utf-8")
        pos = 0
    except UnicodeDecodeError as bad:
        pos = bad.start
    line = raw[:pos].count(b"\n") + 1
    return DataError(
        f"{path}: not UTF-8 text (byte {raw[pos : pos + 1]!r} on line {line}, e.g. a latin-1 export); "
        "save the table as UTF-8 (Excel: 'CSV UTF-8')"
    )


@dataclass
class ColumnSpec:
    """How one clinical column is encoded.

    Args:
        name: raw column name.
        type: ``"numeric"`` or ``"categorical"``.
        mean: train mean (numeric).
        std: train standard deviation, 1.0 when constant or unknown (numeric).
        vocabulary: sorted train categories; the code of a category is its index (categorical).
        inferred: True when the type was inferred from the values rather than declared.
    """

    name: str
    type: ColumnType
    mean: float = 0.0
    std: float = 1.0
    vocabulary: list[str] = field(default_factory=list)
    inferred: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "inferred": self.inferred}
        if self.type == "numeric":
            out.update(mean=self.mean, std=self.std)
        else:
            out["vocabulary"] = list(self.vocabulary)
        return out


class TableSchema:
    """Encoding of clinical table rows, fitted on the train split.

    One feature per column: numeric columns are standardised with the train mean/std, categorical
    columns become the index of the value in the sorted train vocabulary (stored as float). An empty
    cell, a non-number in a numeric column or a category not seen in training gives NaN (the last two
    with a warning naming the column and value), never an exception.

    Args:
        columns: one ``ColumnSpec`` per feature, in feature order.

    Example:
        >>> rows = [{"age": 50, "sex": "female"}, {"age": 70, "sex": "male"}]
        >>> schema = TableSchema.fit(rows, ["age", "sex"], {"sex": "categorical"})
        >>> schema.cardinalities
        [0, 2]
        >>> schema.encode({"age": 60, "sex": "male"}).tolist()
        [0.0, 1.0]
    """

    def __init__(self, columns: Sequence[ColumnSpec]) -> None:
        names = [c.name for c in columns]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicated column names in table schema: {names}")
        self.columns = list(columns)

    # -- fitting --------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        rows: Iterable[Mapping[str, Any]],
        columns: Sequence[str],
        declared: Mapping[str, ColumnType] | None = None,
    ) -> TableSchema:
        """Fit the schema on train rows.

        Args:
            rows: raw rows (``column -> value``) of the **train split only**.
            columns: the feature columns, in feature order.
            declared: column types that are known; the others are inferred (numeric when every
                non-empty train value parses as a number) and flagged ``inferred``.

        Raises:
            ValueError: ``declared`` names a column not in ``columns`` or a bad type.
        """
        declared = dict(declared or {})
        for name, kind in declared.items():
            if kind not in ("numeric", "categorical"):
                raise ValueError(f"column {name!r}: declared type must be 'numeric' or 'categorical', got {kind!r}")
        unknown = sorted(set(declared) - set(columns))
        if unknown:
            raise ValueError(f"declared types for columns {unknown} that are not in columns {list(columns)}")
        rows = list(rows)
        specs = []
        for name in columns:
            values = [r.get(name) for r in rows]
            values = [v for v in values if not is_empty_cell(v)]
            kind = declared.get(name)
            inferred = kind is None
            if kind is None:
                kind = "numeric" if all(_to_float(v) is not None for v in values) and values else "categorical"
                if not values:  # nothing to infer from: a number is the safer guess (NaN until filled)
                    kind = "numeric"
            if kind == "numeric":
                nums = [f for f in (_to_float(v) for v in values) if f is not None]
                if len(nums) < len(values):
                    warnings.warn(
                        f"table column {name!r}: {len(values) - len(nums)} train value(s) are not numbers "
                        "and are treated as empty",
                        stacklevel=2,
                    )
                mean = float(np.mean(nums)) if nums else 0.0
                std = float(np.std(nums)) if len(nums) > 1 else 0.0
                specs.append(ColumnSpec(name, "numeric", mean=mean, std=std if std > 1e-12 else 1.0, inferred=inferred))
            else:
                vocab = sorted({normalise_category(v) for v in values})
                specs.append(ColumnSpec(name, "categorical", vocabulary=vocab, inferred=inferred))
        return cls(specs)

    # -- description ----------------------------------------------------------------------------
    @property
    def num_features(self) -> int:
        return len(self.columns)

    @property
    def cardinalities(self) -> list[int]:
        """Per feature: 0 for numeric, the vocabulary size for categorical (at least 1)."""
        return [0 if c.type == "numeric" else max(1, len(c.vocabulary)) for c in self.columns]

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, row: Mapping[str, Any]) -> np.ndarray:
        """Encode one raw row into ``float32[num_features]``; NaN where empty or unusable."""
        out = np.full(self.num_features, np.nan, dtype=np.float32)
        for i, col in enumerate(self.columns):
            value = row.get(col.name)
            if is_empty_cell(value):
                continue
            if col.type == "numeric":
                f = _to_float(value)
                if f is None:
                    warnings.warn(f"table column {col.name!r}: value {value!r} is not a number; encoded as missing")
                    continue
                out[i] = (f - col.mean) / col.std
            else:
                key = normalise_category(value)
                try:
                    out[i] = col.vocabulary.index(key)
                except ValueError:
                    warnings.warn(
                        f"table column {col.name!r}: category {key!r} was not seen in training; encoded as missing"
                    )
        return out

    # -- persistence ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"version": _SCHEMA_VERSION, "columns": [c.to_json() for c in self.columns]}

    def save(self, path: str | os.PathLike) -> None:
        """Write the schema as human-readable JSON (atomically: temp file then rename)."""
        atomic_write_json(path, self.to_json(), indent=2)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "table schema") -> TableSchema:
        try:
            if data.get("version") != _SCHEMA_VERSION:
                raise KeyError(f"version {data.get('version')!r}")
            specs = []
            for c in data["columns"]:
                if c["type"] == "numeric":
                    specs.append(
                        ColumnSpec(
                            str(c["name"]),
                            "numeric",
                            mean=float(c["mean"]),
                            std=float(c["std"]),
                            inferred=bool(c.get("inferred", False)),
                        )
                    )
                elif c["type"] == "categorical":
                    specs.append(
                        ColumnSpec(
                            str(c["name"]),
                            "categorical",
                            vocabulary=[str(v) for v in c["vocabulary"]],
                            inferred=bool(c.get("inferred", False)),
                        )
                    )
                else:
                    raise KeyError(f"type {c['type']!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{source}: not a valid table schema ({e}); regenerate it by training again") from e
        return cls(specs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TableSchema:
        """Read a schema written by ``save``.

        Raises:
            DataError: the file is missing or is not a valid schema.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"table schema not found: {path}; it is written beside the model during training")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read the table schema ({e})") from e
        return cls.from_json(data, source=path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TableSchema) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        desc = ", ".join(f"{c.name}:{c.type[:3]}" for c in self.columns)
        return f"TableSchema({desc})"
