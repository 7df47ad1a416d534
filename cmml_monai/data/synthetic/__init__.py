"""Synthetic datasets in the exact native layouts of Derm7pt, ODIR-5K and MEN.

The files, folders, columns and value vocabularies are those of the real datasets, so the adapters read
them unchanged. The label is learnable and spread over the modalities: each case draws a latent class
evidence vector (the true label plus shared noise); every modality renders its own noisy, partial view
of it (image colours, sizes and blobs that stay visible after resizing to 32-64 px; table numbers and
categories that correlate with it). Dropping a modality therefore costs accuracy, and the others can
partly stand in for it. Some inputs are naturally missing (absent files, ``clinic == derm`` rows, empty
table cells) and one case per dataset has nothing at all (the adapters drop it).

Each generated folder holds ``synthetic_manifest.json`` with the counts the adapter must find.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np

from cmml_monai.data.errors import DataError
from cmml_monai.data.synthetic.derm7pt import make_derm7pt
from cmml_monai.data.synthetic.men import DEFAULT_MEN_SHAPE, make_men
from cmml_monai.data.synthetic.odir import make_odir

__all__ = [
    "SYNTHETIC_DATASETS",
    "DEFAULT_CASES",
    "MANIFEST_NAME",
    "make_synthetic",
    "ensure_synthetic",
    "DEFAULT_MEN_SHAPE",
]

SYNTHETIC_DATASETS = ("derm7pt", "odir", "men")
DEFAULT_CASES = {"derm7pt": 160, "odir": 160, "men": 60}
MANIFEST_NAME = "synthetic_manifest.json"
_MIN_CASES = 12


def _params(dataset: str, cases: int | None, seed: int, dicom: bool, shape: Sequence[int] | None) -> dict[str, Any]:
    if dataset not in SYNTHETIC_DATASETS:
        raise ValueError(f"unknown synthetic dataset {dataset!r}; expected one of {list(SYNTHETIC_DATASETS)}")
    n = DEFAULT_CASES[dataset] if cases is None else int(cases)
    if n < _MIN_CASES:
        raise ValueError(f"cases must be >= {_MIN_CASES} (every class must occur), got {cases!r}")
    if dicom and dataset != "men":
        raise ValueError(f"dicom=True only applies to the men dataset, not {dataset!r}")
    out: dict[str, Any] = {"dataset": dataset, "cases": n, "seed": int(seed)}
    if dataset == "men":
        shp = tuple(int(s) for s in (shape or DEFAULT_MEN_SHAPE))
        if len(shp) != 3 or min(shp) < 8:
            raise ValueError(f"shape must be 3 sizes >= 8, got {shape!r}")
        out.update(dicom=bool(dicom), shape=list(shp))
    return out


def make_synthetic(
    dataset: str,
    out_dir: str | os.PathLike,
    cases: int | None = None,
    seed: int = 0,
    dicom: bool = False,
    shape: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Write a synthetic ``dataset`` in its native layout into ``out_dir`` (must not exist or be empty).

    The data is written into a temporary sibling folder and renamed at the end, so ``out_dir`` is never
    half-written.

    Args:
        dataset: ``"derm7pt"``, ``"odir"`` or ``"men"``.
        out_dir: destination; pass it as ``dataset_dir`` to the adapter.
        cases: number of cases written (default 160 / 160 / 60); one of them has nothing and is dropped.
        seed: random seed (same seed, same files).
        dicom: MEN only: one DICOM series folder per sequence instead of NIfTI files.
        shape: MEN only: volume shape (default 40 x 40 x 24).

    Returns:
        The manifest (also written as ``synthetic_manifest.json``).

    Raises:
        ValueError: bad arguments. DataError: ``out_dir`` exists and is not empty.

    Example:
        >>> manifest = make_synthetic("derm7pt", "derm7pt_synth", cases=40)  # doctest: +SKIP
    """
    params = _params(dataset, cases, seed, dicom, shape)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise DataError(f"{out_dir} already exists and is not empty; choose another output folder or delete it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}-", dir=parent)
    try:
        rng = np.random.default_rng([params["seed"], SYNTHETIC_DATASETS.index(dataset)])
        n = params["cases"]
        if dataset == "derm7pt":
            summary = make_derm7pt(tmp, n, rng)
        elif dataset == "odir":
            summary = make_odir(tmp, n, rng)
        else:
            summary = make_men(tmp, n, rng, tuple(params["shape"]), params["dicom"])
        manifest = {"params": params, **summary}
        with open(os.path.join(tmp, MANIFEST_NAME), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def ensure_synthetic(
    dataset: str,
    out_dir: str | os.PathLike,
    cases: int | None = None,
    seed: int = 0,
    dicom: bool = False,
    shape: Sequence[int] | None = None,
) -> str:
    """Generate the synthetic dataset once and return the ``dataset_dir`` to give the adapter.

    Reuses ``out_dir`` when its manifest was made with the same parameters.

    Raises:
        DataError: ``out_dir`` holds something else (another dataset or parameters, or no manifest).

    Example:
        >>> dataset_dir = ensure_synthetic("derm7pt", "outputs/synthetic/derm7pt")  # doctest: +SKIP
    """
    params = _params(dataset, cases, seed, dicom, shape)
    out_dir = os.path.abspath(os.fspath(out_dir))
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        try:
            make_synthetic(dataset, out_dir, **{k: v for k, v in params.items() if k != "dataset"})
            return out_dir
        except (DataError, OSError) as e:
            # another process (e.g. a second DDP rank) may have finished the same folder first
            if not os.path.isfile(manifest_path):
                if isinstance(e, DataError):
                    raise
                raise DataError(f"cannot write synthetic data to {out_dir}: {e}") from e
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                found = json.load(f).get("params")
        except (OSError, ValueError, AttributeError) as e:
            raise DataError(f"{manifest_path}: unreadable ({e}); delete {out_dir} to regenerate") from e
        if found != params:
            raise DataError(
                f"{out_dir} holds synthetic data made with {found}, not {params}; delete it or choose another folder"
            )
    return out_dir
