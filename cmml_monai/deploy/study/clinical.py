"""Clinical values of a study (from a table or the DICOM header) and the keyed pseudonym naming a case."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cmml_monai.data.table import read_table

__all__ = ["HEADER_COLUMNS", "ClinicalSource", "header_clinical_values", "pseudonym"]

logger = logging.getLogger(__name__)


def pseudonym(value: str, key: str | bytes, length: int = 16) -> str:
    """A keyed hash (HMAC-SHA256) of ``value``: the same value and key give the same pseudonym; without the
    key it cannot be traced back.

    Raises:
        ValueError: an empty key.

    Example:
        >>> pseudonym("1.2.3", "secret")
        '48df62b60b2d7da8'
    """
    key_bytes = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if not key_bytes:
        raise ValueError(f"the pseudonym key must not be empty, got {key!r}")
    return hmac.new(key_bytes, str(value).encode("utf-8"), hashlib.sha256).hexdigest()[: int(length)]


def _age_years(value: Any) -> float | None:
    """DICOM AS (``045Y``, ``006M``, ``020W``, ``003D``) -> years."""
    m = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", str(value or ""), re.IGNORECASE)
    if not m:
        return None
    n, unit = float(m.group(1)), (m.group(2) or "Y").upper()
    return {"Y": n, "M": n / 12.0, "W": n * 7 / 365.25, "D": n / 365.25}[unit]


_SEX_WORDS = {
    "M": ("M", "male", "Male", "m", "man"),
    "F": ("F", "female", "Female", "f", "woman"),
    "O": ("O", "other", "Other", "o"),
}


def _sex_value(code: Any, vocabulary: Sequence[str] | None) -> str | None:
    """PatientSex (M/F/O) in the words the network was trained with (e.g. ``male``/``female``)."""
    c = str(code or "").strip().upper()
    if c not in _SEX_WORDS:
        return None
    for word in _SEX_WORDS[c]:
        if vocabulary is None or word in vocabulary:
            return word
    return c


#: clinical column -> the header attribute it comes from by default
HEADER_COLUMNS = {"age": "PatientAge", "sex": "PatientSex", "weight": "PatientWeight", "height": "PatientSize"}


def header_clinical_values(
    header: Any,
    columns: Sequence[str],
    vocabularies: Mapping[str, Sequence[str]] | None = None,
    attributes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Clinical values of ``columns`` from a DICOM header: age in years, sex in the trained words, weight kg,
    height (PatientSize) in m; None where the header has nothing.

    Args:
        header: a pydicom Dataset of the study.
        columns: the network's table columns.
        vocabularies: categorical column -> the trained categories.
        attributes: column -> DICOM keyword, over :data:`HEADER_COLUMNS`.

    Example:
        >>> header_clinical_values(ds, ["age", "sex"], {"sex": ["female", "male"]})  # doctest: +SKIP
        {'age': 45.0, 'sex': 'male'}
    """
    attrs = {**HEADER_COLUMNS, **dict(attributes or {})}
    vocab = dict(vocabularies or {})
    out: dict[str, Any] = {}
    for col in columns:
        keyword = attrs.get(col)
        raw = header.get(keyword) if keyword else None
        if keyword == "PatientAge":
            out[col] = _age_years(raw)
        elif keyword == "PatientSex":
            out[col] = _sex_value(raw, vocab.get(col))
        elif raw is None or str(raw).strip() == "":
            out[col] = None
        else:
            try:
                out[col] = float(raw)
            except (TypeError, ValueError):
                out[col] = str(raw)
    return out


@dataclass
class ClinicalSource:
    """Where a study's clinical values come from.

    Args:
        csv: a CSV/XLSX table; ``None`` takes them from the DICOM header (:func:`header_clinical_values`).
        id_column: the table's id column.
        key_attribute: DICOM keyword whose value keys the row (e.g. ``AccessionNumber``); ``None`` keys it by
            the case id (the caller's id or the pseudonym).
        attributes: header mode: column -> DICOM keyword, over :data:`HEADER_COLUMNS`.

    Example:
        >>> ClinicalSource(csv="clinical.csv", id_column="case_id")  # doctest: +SKIP
    """

    csv: str | None = None
    id_column: str = "case_id"
    key_attribute: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    def values(
        self, header: Any, case_id: str, columns: Sequence[str], vocabularies: Mapping[str, Sequence[str]] | None = None
    ) -> dict[str, Any]:
        """The clinical values of one study (None where unknown).

        Raises:
            DataError: the table lacks the id column or a column the network takes.
        """
        if self.csv is None:
            return header_clinical_values(header, columns, vocabularies, self.attributes)
        df = read_table(self.csv, required=[self.id_column, *columns])
        key = case_id if self.key_attribute is None else str(header.get(self.key_attribute, "") or "")
        ids = df[self.id_column].map(lambda v: str(v).strip())
        rows = df[ids == str(key).strip()]
        if rows.empty:
            # the key may be an identifier: the message names the case, not the key
            logger.warning("%s: no row in the clinical table; its clinical values are missing", case_id)
            return {c: None for c in columns}
        row = rows.iloc[0]
        out = {}
        for c in columns:
            v = row[c]
            out[c] = None if v is None or (isinstance(v, float) and math.isnan(v)) else v
        return out
