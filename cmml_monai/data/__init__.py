"""cmml_monai.data: everything between a dataset's native layout and a batch of tensors.

Owns the dataset adapters (native layout -> ``CaseList``), the case list, the clinical table and its
schema, image readers, transforms, datasets and loaders, natural and simulated missingness, validation
views, synthetic data, dataset summaries, and the config-facing ``load_cases`` / ``fit_schema`` /
``DatasetInfo``. The lowest layer after ``cmml_monai.utils``: it imports nothing else of the package.

The public names below are imported on first use (PEP 562), so that reading a case list, a mask file
or a summary does not import torch and MONAI: ``scripts/inspect_data.py`` stays light and quiet.
"""

from __future__ import annotations

import importlib
from typing import Any

# module of this package -> the public names it defines
_EXPORTS: dict[str, tuple[str, ...]] = {
    "cases": ("SPLITS", "TABLE_MODALITY", "Case", "CaseList", "ModalitySpec"),
    "adapters": ("ADAPTERS", "DATASET_NAMES", "adapter_options", "load_dataset"),
    "setup": ("load_cases", "fit_schema", "DatasetInfo"),
    "report": ("summarize", "format_summary"),
    "dataset": (
        "RESERVED_KEYS",
        "CaseDataset",
        "CaseCacheDataset",
        "CasePersistentDataset",
        "data_dicts",
        "case_transforms",
        "hash_with_file_stats",
        "build_dataset",
        "collate_cases",
        "build_dataloader",
    ),
    "errors": ("DataError", "find_data_error", "install_data_error_hook"),
    "jsonio": ("atomic_write_json",),
    "missingness": (
        "DEFAULT_RATES",
        "rate_key",
        "natural_presence",
        "simulate_presence",
        "fixed_subset_presence",
        "all_subsets",
        "apply_presence_mask",
        "save_masks",
        "ensure_masks",
        "ensure_split_masks",
    ),
    "validation": ("PresenceMaskedDataset", "MissingRateViews", "validation_views"),
    "readers": (
        "IMAGE_2D_SUFFIXES",
        "NIFTI_SUFFIXES",
        "SAFE_META_KEYS",
        "DicomSeriesInfo",
        "list_dicom_series",
        "select_dicom_series",
        "strip_phi",
        "load_image",
        "LoadModalityd",
    ),
    "transforms": (
        "IMAGENET_MEAN",
        "IMAGENET_STD",
        "TableEncoder",
        "image_transforms",
        "resolve_pixdim",
        "ApplyToPresentd",
        "PackModalitiesd",
        "table_is_empty",
    ),
    "synthetic": (
        "SYNTHETIC_DATASETS",
        "DEFAULT_CASES",
        "DEFAULT_MEN_SHAPE",
        "MANIFEST_NAME",
        "make_synthetic",
        "ensure_synthetic",
    ),
    "table": ("ColumnType", "ColumnSpec", "TableSchema", "read_table", "is_empty_cell", "normalise_category"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str) -> Any:
    """``cmml_monai.data.<name>``: imports the defining module on first use and caches the value."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
