"""The case list: what every dataset adapter yields and every later stage consumes.

A case has k modalities: the image modalities in a fixed order, then (optionally) the clinical
table as the last modality. Missing image modalities have ``path None`` and a reason.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from cmml_monai.data.errors import DataError

__all__ = ["ModalitySpec", "Case", "CaseList", "TABLE_MODALITY", "SPLITS"]

TABLE_MODALITY = "table"
#: the standard splits, in the order adapters assign and reports list them
SPLITS = ("train", "valid", "test")
ModalityKind = Literal["image2d", "image3d", "table"]


@dataclass(frozen=True)
class ModalitySpec:
    """One modality of a dataset.

    Args:
        name: modality name, e.g. ``"clinic"``, ``"derm"``, ``"left"``, ``"t1c"``, ``"table"``.
        kind: ``"image2d"`` (RGB photo / fundus), ``"image3d"`` (MRI sequence) or ``"table"``.
        channels: channels this modality owns in the packed ``image`` tensor (3 for RGB, 1 for MRI,
            0 for the table).
    """

    name: str
    kind: ModalityKind
    channels: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("image2d", "image3d", "table"):
            raise ValueError(f"modality {self.name!r}: kind must be image2d, image3d or table, got {self.kind!r}")


@dataclass
class Case:
    """One case (patient / lesion / study).

    Args:
        case_id: unique id within the dataset.
        split: ``"train"``, ``"valid"`` or ``"test"``.
        paths: image modality name -> file path or DICOM series folder, ``None`` when missing.
        missing_reason: image modality name -> why it is missing (e.g. ``"file absent"``,
            ``"clinic == derm"``). Only for missing modalities.
        table: raw clinical values by column name (``None`` / NaN = empty cell).
        label: class index (single-label) or a 0/1 list (multi-label); None for new cases read without
            labels (the adapters' ``labels=False``, inference only).
    """

    case_id: str
    split: str
    paths: dict[str, str | None]
    label: int | list[int] | None
    table: dict[str, Any] = field(default_factory=dict)
    missing_reason: dict[str, str] = field(default_factory=dict)

    def table_present(self, columns: Sequence[str]) -> bool:
        """True when at least one of ``columns`` has a non-empty value."""
        return any(not _is_empty(self.table.get(c)) for c in columns)


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


@dataclass
class CaseList:
    """All cases of one dataset plus what describes them.

    Args:
        name: dataset name (``"derm7pt"``, ``"odir"``, ``"men"``).
        modalities: image modalities in packing order, then the table modality if any.
        class_names: label names (classes for single-label, labels for multi-label).
        multi_label: True for ODIR-5K style 0/1 label vectors.
        table_columns: clinical columns used as features (raw names).
        cases: the usable cases.
        dropped: ``(case_id, reason)`` of cases that were dropped (e.g. every modality missing).
        table_types: declared type (``"numeric"`` / ``"categorical"``) of table columns the adapter knows;
            ``TableSchema.fit(..., declared=table_types)`` infers the others.
        split_made: True when the project made the split (saved in a split file keyed to the case ids), False
            when it comes with the data (then the case fingerprint covers it).
    """

    name: str
    modalities: list[ModalitySpec]
    class_names: list[str]
    multi_label: bool
    table_columns: list[str]
    cases: list[Case]
    dropped: list[tuple[str, str]] = field(default_factory=list)
    table_types: dict[str, str] = field(default_factory=dict)
    split_made: bool = False

    def __post_init__(self) -> None:
        counts = Counter(c.case_id for c in self.cases)
        dupes = sorted(k for k, v in counts.items() if v > 1)
        if dupes:
            raise DataError(
                f"{self.name}: duplicated case ids {dupes[:5]}{' ...' if len(dupes) > 5 else ''}; "
                "each case id must appear once: fix the table or the folder names"
            )

    @property
    def image_modalities(self) -> list[ModalitySpec]:
        return [m for m in self.modalities if m.kind != "table"]

    @property
    def has_table(self) -> bool:
        return any(m.kind == "table" for m in self.modalities)

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def split(self, name: str) -> list[Case]:
        return [c for c in self.cases if c.split == name]

    def present(self, case: Case) -> list[bool]:
        """Natural presence of each modality of ``case``, in ``modalities`` order."""
        flags = []
        for m in self.modalities:
            if m.kind == "table":
                flags.append(case.table_present(self.table_columns))
            else:
                flags.append(case.paths.get(m.name) is not None)
        return flags
