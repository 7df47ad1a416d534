"""Synthetic MEN (BraTS meningioma): one folder per case with four MRI sequences (NIfTI or DICOM series)
and ``clinical.csv``.

Example:
    >>> counts = make_men(tmp_dir, 14, np.random.default_rng([0, 2]), (40, 40, 24), dicom=False)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from cmml_monai.data.adapters.men import MEN_CLASSES, MEN_SEQUENCES
from cmml_monai.data.adapters.splits import DEFAULT_FRACTIONS, stratified_split
from cmml_monai.data.synthetic.common import class_views, manifest_counts, softmax

__all__ = ["make_men", "DEFAULT_MEN_SHAPE", "MEN_SPACING"]

DEFAULT_MEN_SHAPE = (40, 40, 24)
MEN_SPACING = (4.8, 4.8, 6.0)  # a 40x40x24 grid then spans a head-sized 192 x 192 x 144 mm

_MEN_BRAIN = {"t1c": 420.0, "t1n": 380.0, "t2w": 520.0, "t2f": 460.0}


def _men_volume(
    rng: np.random.Generator, seq: str, p_high: float, shape: tuple[int, int, int], centre: np.ndarray
) -> np.ndarray:
    xx, yy, zz = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    sx, sy, sz = (np.array(shape, np.float32) - 1) / 2
    brain = ((xx - sx) / (0.42 * shape[0])) ** 2 + ((yy - sy) / (0.46 * shape[1])) ** 2 + (
        (zz - sz) / (0.44 * shape[2])
    ) ** 2 <= 1
    vol = np.where(brain, _MEN_BRAIN[seq], 0.0).astype(np.float32)
    # the tumour: bigger with high-grade evidence; each sequence shows a different part of it
    scale = min(shape[:2]) / 40.0
    radius = (3.5 + 3.5 * p_high) * scale
    dz = (zz - centre[2]) * MEN_SPACING[2] / MEN_SPACING[0]  # distances in in-plane voxel units
    d = np.sqrt((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 + dz**2)
    tumour = d <= radius
    if seq == "t1c":  # enhancing rim and, for high grade, a dark necrotic core
        vol[tumour] = 900 - 250 * p_high
        vol[d <= radius * 0.55 * p_high] = 250
    elif seq == "t2f":  # oedema halo grows with grade
        vol[(d <= radius * (1.2 + 1.3 * p_high)) & brain] = 750
        vol[tumour] = 600
    elif seq == "t2w":
        vol[tumour] = 600 + 300 * p_high
    else:
        vol[tumour] = 330 - 80 * p_high
    vol += rng.normal(0, 25, vol.shape).astype(np.float32) * brain
    return np.clip(vol, 0, 4000).astype(np.int16)


def _write_dicom_series(folder: str, vol: np.ndarray, case_num: int, seq: str, series_num: int) -> None:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    os.makedirs(folder)
    # deterministic UIDs: the same seed gives the same files
    study_uid = generate_uid(entropy_srcs=[f"cmml-synthetic-study-{case_num}"])
    series_uid = generate_uid(entropy_srcs=[f"cmml-synthetic-series-{case_num}-{seq}"])
    frame_uid = generate_uid(entropy_srcs=[f"cmml-synthetic-frame-{case_num}"])
    sx, sy, sz = MEN_SPACING
    for k in range(vol.shape[2]):
        sop_uid = generate_uid(entropy_srcs=[f"cmml-synthetic-sop-{case_num}-{seq}-{k}"])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        filename = os.path.join(folder, f"{k + 1:04d}.dcm")
        ds = FileDataset(filename, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "MR"
        ds.PatientName = f"Synthetic^Case{case_num:03d}"
        ds.PatientID = f"SYN{case_num:05d}"
        ds.SeriesDescription = seq
        ds.SeriesNumber, ds.InstanceNumber = series_num, k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k * sz)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(sy), float(sx)]  # row spacing, column spacing
        ds.SliceThickness = float(sz)
        ds.SpacingBetweenSlices = float(sz)
        ds.SliceLocation = float(k * sz)
        # a DICOM slice is rows x columns = y x x
        plane = np.ascontiguousarray(vol[:, :, k].T.astype(np.int16))
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = plane.tobytes()
        pydicom.dcmwrite(filename, ds, enforce_file_format=True)


def make_men(root: str, n: int, rng: np.random.Generator, shape: tuple[int, int, int], dicom: bool) -> dict[str, Any]:
    """Write ``n`` MEN cases under ``root`` (``dicom``: DICOM series folders, else NIfTI files); the manifest
    counts (:func:`manifest_counts`). Some cases lack a sequence; the last case has nothing (dropped).

    Example:
        >>> make_men(tmp_dir, 14, np.random.default_rng([0, 2]), (16, 16, 10), False)["n_cases"]  # doctest: +SKIP
        13
    """
    import nibabel as nib

    os.makedirs(root, exist_ok=True)
    y = (rng.random(n) < 0.4).astype(int)
    y[:2] = [0, 1]
    views = class_views(rng, np.eye(2)[y], len(MEN_SEQUENCES) + 1, signal=1.6, shared=0.7, own=1.0)
    affine = np.diag([*MEN_SPACING, 1.0])
    rows, labels, missing = [], {}, {}
    absent_seq = {
        int(i): str(rng.choice(MEN_SEQUENCES))
        for i in rng.choice(np.arange(1, n - 1), size=max(2, n // 10), replace=False)
    }
    for i in range(n):
        cid = f"BraTS-MEN-{i + 1:05d}-000"
        case_dir = os.path.join(root, cid)
        os.makedirs(case_dir)
        centre = np.array(shape, float) / 2 + rng.normal(0, 1, 3) * np.array(shape) * 0.08
        miss = {}
        for s_idx, seq in enumerate(MEN_SEQUENCES):
            if absent_seq.get(i) == seq or i == n - 1:
                miss[seq] = "file absent"
                continue
            p_high = float(softmax(views[s_idx][i], 1.5)[1])
            vol = _men_volume(rng, seq, p_high, shape, centre)
            if dicom:
                _write_dicom_series(os.path.join(case_dir, seq), vol, i + 1, seq, s_idx + 1)
            else:
                nib.save(nib.Nifti1Image(vol, affine), os.path.join(case_dir, f"{cid}-{seq}.nii.gz"))
        pt = softmax(views[-1][i], 1.5)[1]
        age: Any = int(np.clip(round(52 + 7 * rng.standard_normal() + 24 * (pt - 0.5)), 18, 90))
        sex: Any = "male" if rng.random() < 0.2 + 0.55 * pt else "female"
        if rng.random() < 0.05:
            sex = None
        if rng.random() < 0.04:
            age = sex = None
        if i == n - 1:
            age = sex = None
        if age is None and sex is None:
            miss["table"] = "empty"
        grade = 1 if y[i] == 0 else int(rng.choice([2, 3], p=[0.8, 0.2]))
        rows.append({"case_id": cid, "grade": grade, "age": age, "sex": sex})
        labels[cid] = int(y[i])
        missing[cid] = miss
    table = pd.DataFrame(rows, columns=["case_id", "grade", "age", "sex"])
    table.to_csv(os.path.join(root, "clinical.csv"), index=False)
    dropped = [(f"BraTS-MEN-{n:05d}-000", "every modality missing")]
    labels.pop(dropped[0][0])
    splits = stratified_split(list(labels), [str(v) for v in labels.values()], DEFAULT_FRACTIONS, 0)
    return manifest_counts(labels, splits, MEN_CLASSES, False, missing, [*MEN_SEQUENCES, "table"], dropped)
