"""cmml_monai.data: everything between a dataset's native layout and a batch of tensors.

Owns the dataset adapters (native layout -> ``CaseList``), the case list, the clinical table and its
schema, image readers, transforms, datasets and loaders, natural and simulated missingness, validation
views, synthetic data, dataset summaries, and the config-facing ``load_cases`` / ``fit_schema`` /
``DatasetInfo``. The lowest layer after ``cmml_monai.utils``: it imports nothing else of the package.
"""

from cmml_monai.data.adapters import ADAPTERS, DATASET_NAMES, adapter_options, load_dataset
from cmml_monai.data.cases import TABLE_MODALITY, Case, CaseList, ModalitySpec
from cmml_monai.data.dataset import (
    RESERVED_KEYS,
    CaseCacheDataset,
    CaseDataset,
    CasePersistentDataset,
    build_dataloader,
    build_dataset,
    case_transforms,
    collate_cases,
    data_dicts,
    hash_with_file_stats,
)
from cmml_monai.data.errors import DataError, find_data_error, install_data_error_hook
from cmml_monai.data.jsonio import atomic_write_json
from cmml_monai.data.missingness import (
    DEFAULT_RATES,
    all_subsets,
    apply_presence_mask,
    ensure_masks,
    ensure_split_masks,
    fixed_subset_presence,
    natural_presence,
    rate_key,
    save_masks,
    simulate_presence,
)
from cmml_monai.data.readers import (
    IMAGE_2D_SUFFIXES,
    NIFTI_SUFFIXES,
    SAFE_META_KEYS,
    DicomSeriesInfo,
    LoadModalityd,
    list_dicom_series,
    load_image,
    select_dicom_series,
    strip_phi,
)
from cmml_monai.data.report import format_summary, summarize
from cmml_monai.data.setup import DatasetInfo, dataset_summary, fit_schema, load_cases
from cmml_monai.data.synthetic import (
    DEFAULT_CASES,
    DEFAULT_MEN_SHAPE,
    MANIFEST_NAME,
    SYNTHETIC_DATASETS,
    ensure_synthetic,
    make_synthetic,
)
from cmml_monai.data.table import ColumnSpec, ColumnType, TableSchema, is_empty_cell, normalise_category, read_table
from cmml_monai.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ApplyToPresentd,
    PackModalitiesd,
    TableEncoder,
    image_transforms,
    resolve_pixdim,
    table_is_empty,
)
from cmml_monai.data.validation import MissingRateViews, validation_views

__all__ = [
    # adapters and cases
    "ADAPTERS",
    "DATASET_NAMES",
    "adapter_options",
    "load_dataset",
    "TABLE_MODALITY",
    "Case",
    "CaseList",
    "ModalitySpec",
    # config-facing setup and summaries
    "load_cases",
    "fit_schema",
    "DatasetInfo",
    "dataset_summary",
    "summarize",
    "format_summary",
    # datasets and loaders
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
    # errors and files
    "DataError",
    "find_data_error",
    "install_data_error_hook",
    "atomic_write_json",
    # missingness and validation views
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
    "MissingRateViews",
    "validation_views",
    # readers and transforms
    "IMAGE_2D_SUFFIXES",
    "NIFTI_SUFFIXES",
    "SAFE_META_KEYS",
    "DicomSeriesInfo",
    "list_dicom_series",
    "select_dicom_series",
    "strip_phi",
    "load_image",
    "LoadModalityd",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TableEncoder",
    "image_transforms",
    "resolve_pixdim",
    "ApplyToPresentd",
    "PackModalitiesd",
    "table_is_empty",
    # synthetic data
    "SYNTHETIC_DATASETS",
    "DEFAULT_CASES",
    "DEFAULT_MEN_SHAPE",
    "MANIFEST_NAME",
    "make_synthetic",
    "ensure_synthetic",
    # clinical table
    "ColumnType",
    "ColumnSpec",
    "TableSchema",
    "read_table",
    "is_empty_cell",
    "normalise_category",
]
