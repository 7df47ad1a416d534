"""Data plumbing for the configs: case list, table schema and the dataset facts the network is built from."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

from cmml_monai.data.adapters import load_dataset
from cmml_monai.data.cases import SPLITS, CaseList
from cmml_monai.data.errors import DataError
from cmml_monai.data.synthetic import SYNTHETIC_DATASETS, ensure_synthetic
from cmml_monai.data.table import TableSchema
from cmml_monai.utils import as_bool

__all__ = ["load_cases", "fit_schema", "DatasetInfo"]


def load_cases(
    dataset: str,
    dataset_dir: str,
    synthetic: bool = False,
    synthetic_cases: int | None = None,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
) -> CaseList:
    """The dataset's ``CaseList``; with ``synthetic`` a small synthetic set is generated in ``dataset_dir``
    on first use (``ensure_synthetic``), so the default config runs on a fresh machine.

    Args:
        dataset: ``derm7pt``, ``odir``, ``men`` or ``manifest``.
        dataset_dir: the native layout or the manifest (or where the synthetic data go).
        synthetic: generate synthetic data in ``dataset_dir`` when it is not there yet.
        synthetic_cases: number of synthetic cases (None: the generator's default).
        seed: synthetic data seed.
        options: adapter options (``cmml_monai.data.adapters.adapter_options``).
    """
    if as_bool(synthetic, "synthetic"):
        if dataset not in SYNTHETIC_DATASETS:
            raise DataError(
                f"dataset {dataset!r} has no synthetic stand-in; pass --synthetic false with your "
                f"dataset_dir (configs/datasets/{dataset}.json sets it)"
            )
        dataset_dir = ensure_synthetic(dataset, dataset_dir, cases=synthetic_cases, seed=seed)
    case_list = load_dataset(dataset, dataset_dir, **dict(options or {}))
    for split in SPLITS:
        if not case_list.split(split):
            reasons = Counter(reason for _, reason in case_list.dropped)
            raise DataError(
                f"dataset {dataset!r} in {dataset_dir} has no {split!r} cases; every split is needed"
                f" (dropped: {dict(reasons) or 'none'}; {len(case_list.cases)} usable cases)"
            )
    return case_list


def fit_schema(
    case_list: CaseList, path: str | None = None, declared: Mapping[str, str] | None = None, reuse: bool = False
) -> TableSchema | None:
    """Fit the table schema on the train split (None when the dataset has no table); save it to ``path``.

    With ``reuse`` (evaluation) an existing ``path`` is loaded instead: the schema the model was trained with.
    """
    if not case_list.has_table:
        return None
    if reuse and path and os.path.isfile(path):
        return TableSchema.load(path)
    rows = [c.table for c in case_list.split("train")]
    # the adapter knows the types of its native columns; the config may override them
    types = {**case_list.table_types, **dict(declared or {})}
    schema = TableSchema.fit(rows, case_list.table_columns, types or None)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        schema.save(path)
    return schema


class DatasetInfo:
    """What the network constructor needs from the data (the shared constructor's first arguments).

    Attributes:
        image_modalities, image_channels, spatial_dims, num_classes, multi_label, tabular_cardinalities,
        modality_names, class_names.
    """

    def __init__(self, case_list: CaseList, schema: TableSchema | None = None) -> None:
        images = case_list.image_modalities
        if not images:
            raise ValueError(f"dataset {case_list.name!r} has no image modality")
        channels = {m.channels for m in images}
        if len(channels) != 1:
            raise ValueError(f"image modalities must have equal channels, got {[(m.name, m.channels) for m in images]}")
        kinds = {m.kind for m in images}
        self.image_modalities = len(images)
        self.image_channels = channels.pop()
        self.spatial_dims = 3 if "image3d" in kinds else 2
        self.num_classes = len(case_list.class_names)
        self.multi_label = case_list.multi_label
        self.tabular_cardinalities = schema.cardinalities if schema is not None else None
        self.modality_names = case_list.modality_names
        self.class_names = list(case_list.class_names)
        self.activation = "sigmoid" if self.multi_label else "softmax"

    def __repr__(self) -> str:
        return f"DatasetInfo({vars(self)})"
