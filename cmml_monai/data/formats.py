"""Image file formats by name: which suffixes are 2D images and which are volumes (no torch/MONAI import,
so the adapters can tell them apart without loading the readers)."""

from __future__ import annotations

import os

__all__ = ["IMAGE_2D_SUFFIXES", "NIFTI_SUFFIXES", "ITK_ONLY_SUFFIXES", "VOLUME_SUFFIXES", "path_suffix"]

IMAGE_2D_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_ONLY_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")  # other volume formats: ITK whatever the DICOM reader
#: single files holding a volume (a DICOM series folder has no suffix)
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, *ITK_ONLY_SUFFIXES, ".dcm")


def path_suffix(path: str) -> str:
    """The lower-case suffix of ``path`` that names its format: ``.nii.gz`` as one suffix, else the last one.

    Example:
        >>> path_suffix("case1/T1C.NII.GZ")
        '.nii.gz'
    """
    low = path.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else os.path.splitext(low)[1]
