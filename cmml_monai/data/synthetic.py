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
from collections import Counter
from typing import Any, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from cmml_monai.data.adapters.derm7pt import DERM7PT_CLASSES, DERM7PT_COLUMNS
from cmml_monai.data.adapters.men import MEN_CLASSES, MEN_SEQUENCES
from cmml_monai.data.adapters.odir import ODIR_ANNOTATION_FILE, ODIR_LABELS
from cmml_monai.data.adapters.splits import DEFAULT_FRACTIONS, stratified_split
from cmml_monai.data.errors import DataError

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
DEFAULT_MEN_SHAPE = (40, 40, 24)
MANIFEST_NAME = "synthetic_manifest.json"
_MEN_SPACING = (4.8, 4.8, 6.0)  # a 40x40x24 grid then spans a head-sized 192 x 192 x 144 mm
_MIN_CASES = 12


def _softmax(x: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.exp(t * (x - x.max(axis=-1, keepdims=True)))
    return z / z.sum(axis=-1, keepdims=True)


def _views(
    rng: np.random.Generator,
    onehot: np.ndarray,
    n_views: int,
    signal: float = 2.0,
    shared: float = 0.8,
    own: float = 1.0,
) -> list[np.ndarray]:
    """Per-modality noisy views of the class evidence: shared noise links them, own noise separates them."""
    base = signal * onehot + shared * rng.standard_normal(onehot.shape)
    return [base + own * rng.standard_normal(onehot.shape) for _ in range(n_views)]


def _jpeg(arr: np.ndarray, path: str, quality: int = 88) -> None:
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=quality)


def _summary(
    labels: dict[str, Any],
    splits: dict[str, str],
    class_names: Sequence[str],
    multi_label: bool,
    missing: dict[str, dict[str, str]],
    modality_names: Sequence[str],
    dropped: list[tuple[str, str]],
) -> dict[str, Any]:
    """The manifest counts, computed from what was written (same definitions as ``report.summarize``)."""
    counts = Counter(splits[c] for c in labels)
    if multi_label:
        label_counts = {n: int(sum(labels[c][j] for c in labels)) for j, n in enumerate(class_names)}
    else:
        label_counts = {n: int(sum(labels[c] == j for c in labels)) for j, n in enumerate(class_names)}
    miss = {m: 0 for m in modality_names}
    reasons: dict[str, dict[str, int]] = {m: {} for m in modality_names}
    for cid in labels:
        for m, why in missing.get(cid, {}).items():
            miss[m] += 1
            reasons[m][why] = reasons[m].get(why, 0) + 1
    return {
        "n_cases": len(labels),
        "splits": {s: int(counts.get(s, 0)) for s in ("train", "valid", "test")},
        "label_counts": label_counts,
        "missing": miss,
        "missing_reasons": {m: r for m, r in reasons.items() if r},
        "dropped": len(dropped),
    }


# ---------------------------------------------------------------------------------------------- Derm7pt
_DERM_DIAGNOSES = {
    "BCC": ["basal cell carcinoma"],
    "NEV": [
        "blue nevus",
        "clark nevus",
        "combined nevus",
        "congenital nevus",
        "dermal nevus",
        "recurrent nevus",
        "reed or spitz nevus",
    ],
    "MEL": [
        "melanoma",
        "melanoma (in situ)",
        "melanoma (less than 0.76 mm)",
        "melanoma (0.76 to 1.5 mm)",
        "melanoma (more than 1.5 mm)",
        "melanoma metastasis",
    ],
    "MISC": ["dermatofibroma", "lentigo", "melanosis", "miscellaneous", "vascular lesion"],
    "SK": ["seborrheic keratosis"],
}
_DERM_PRIOR = [0.12, 0.34, 0.24, 0.15, 0.15]
_DERM_ELEVATION = ["flat", "palpable", "nodular"]
_DERM_LOCATION = [
    "abdomen",
    "acral",
    "back",
    "buttocks",
    "chest",
    "genital areas",
    "head neck",
    "lower limbs",
    "upper limbs",
]
# per class: preferred elevation / location index (the table's share of the class evidence)
_DERM_ELEV_OF = [2, 0, 1, 0, 1]
_DERM_LOC_OF = [6, 2, 8, 7, 4]
_DERM_FOLDERS = ["Aal", "Abl", "Fbl", "Ggl", "NEL", "Nml"]
# lesion colour per class, one palette per image modality (RGB)
_DERM_PALETTE = {
    "clinic": np.array([[205, 120, 125], [120, 75, 45], [45, 30, 60], [175, 95, 60], [150, 130, 70]], float),
    "derm": np.array([[220, 150, 170], [150, 95, 55], [40, 35, 95], [195, 120, 90], [110, 95, 40]], float),
}
_DERM_SIZE = np.array([0.20, 0.26, 0.34, 0.18, 0.30])
_DERM_ASPECT = np.array([1.0, 1.0, 1.5, 1.2, 0.7])


_VIGNETTE: list[np.ndarray] = []


def _vignette() -> np.ndarray:
    """The dark corners of a dermoscope, ``[512, 768, 1]`` (computed once)."""
    if not _VIGNETTE:
        yy, xx = np.mgrid[0:512, 0:768]
        r = np.sqrt(((xx - 384) / 384) ** 2 + ((yy - 256) / 256) ** 2)
        _VIGNETTE.append(np.clip(1.25 - 0.6 * r, 0.2, 1.0).astype(np.float32)[..., None])
    return _VIGNETTE[0]


def _derm_image(rng: np.random.Generator, p: np.ndarray, modality: str) -> np.ndarray:
    w, h = 192, 128  # drawn small, upsampled to the native 768x512
    skin = np.array([222, 180, 150]) + rng.normal(0, 12, 3)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in np.clip(skin, 0, 255)))
    draw = ImageDraw.Draw(img)
    color = p @ _DERM_PALETTE[modality] + rng.normal(0, 10, 3)
    size = float(p @ _DERM_SIZE) * h * (1 + rng.normal(0, 0.08))
    aspect = float(p @ _DERM_ASPECT)
    cx, cy = w / 2 + rng.normal(0, w * 0.06), h / 2 + rng.normal(0, h * 0.06)
    rx, ry = size * aspect, size / aspect
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(int(v) for v in np.clip(color, 0, 255)))
    if modality == "derm":  # dermoscopy: a dark ring of the lens and a blue-ish veil grows with MEL evidence
        veil = float(p[DERM7PT_CLASSES.index("MEL")])
        core = np.clip(color * (1 - 0.5 * veil) + np.array([0, 0, 90]) * veil, 0, 255)
        draw.ellipse([cx - rx * 0.5, cy - ry * 0.5, cx + rx * 0.5, cy + ry * 0.5], fill=tuple(int(v) for v in core))
    img = img.filter(ImageFilter.GaussianBlur(1.2)).resize((768, 512), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    if modality == "derm":
        arr = arr * _vignette()
    return arr + rng.integers(-8, 9, arr.shape, dtype=np.int16)


def _make_derm7pt(root: str, n: int, rng: np.random.Generator) -> dict[str, Any]:
    rel = os.path.join(root, "release_v0")
    os.makedirs(os.path.join(rel, "meta"))
    y = rng.choice(len(DERM7PT_CLASSES), size=n, p=_DERM_PRIOR)
    y[: len(DERM7PT_CLASSES)] = np.arange(len(DERM7PT_CLASSES))  # every class occurs
    onehot = np.eye(len(DERM7PT_CLASSES))[y]
    v_clinic, v_derm, v_table = _views(rng, onehot, 3, signal=2.5, shared=0.6, own=1.0)
    # natural missingness: ~6% clinic == derm, two absent derm files, some empty table cells,
    # and the last case has nothing (clinic == derm, derm absent, empty table) -> dropped
    same = rng.random(n) < 0.06
    same[0], same[n - 1] = True, True
    absent_derm = {int(i) for i in rng.choice(np.arange(1, n - 1), size=2, replace=False)} | {n - 1}
    rows, labels, missing = [], {}, {}
    for i in range(n):
        cls = DERM7PT_CLASSES[int(y[i])]
        folder = _DERM_FOLDERS[i % len(_DERM_FOLDERS)]
        os.makedirs(os.path.join(rel, "images", folder), exist_ok=True)
        ext_c = ".JPG" if i % 3 == 0 else ".jpg"
        clinic_rel = f"{folder}/{folder}{2 * i:03d}{ext_c}"
        derm_rel = f"{folder}/{folder.lower().capitalize()}{2 * i + 1:03d}.jpg"
        pt = _softmax(v_table[i], 1.5)
        elev_cls = int(np.argmax(v_table[i] + rng.gumbel(size=len(pt)) * 0.7))
        elevation = _DERM_ELEVATION[_DERM_ELEV_OF[elev_cls]] if rng.random() > 0.15 else rng.choice(_DERM_ELEVATION)
        location = _DERM_LOCATION[_DERM_LOC_OF[elev_cls]] if rng.random() > 0.35 else rng.choice(_DERM_LOCATION)
        sex = "male" if rng.random() < (0.6 if cls in ("BCC", "MEL") else 0.45) else "female"
        if rng.random() < 0.04:
            location = ""
        if rng.random() < 0.03:
            elevation = ""
        if rng.random() < 0.03:  # a row without any clinical value: the table modality is missing
            elevation = location = sex = ""
        if i == n - 1:
            elevation = location = sex = ""
        miss = {}
        if same[i]:
            clinic_rel = derm_rel
            miss["clinic"] = "clinic == derm"
        else:
            _jpeg(_derm_image(rng, _softmax(v_clinic[i], 1.5), "clinic"), os.path.join(rel, "images", clinic_rel))
        if i in absent_derm:
            miss["derm"] = "file absent"
        else:
            _jpeg(_derm_image(rng, _softmax(v_derm[i], 1.5), "derm"), os.path.join(rel, "images", derm_rel))
        if not (elevation or location or sex):
            miss["table"] = "empty"
        score = int(np.clip(round(pt[DERM7PT_CLASSES.index("MEL")] * 6 + rng.normal(0, 1)), 0, 9))
        rows.append(
            {
                "case_num": i + 1,
                "diagnosis": rng.choice(_DERM_DIAGNOSES[cls]),
                "seven_point_score": score,
                "pigment_network": rng.choice(["absent", "typical", "atypical"]),
                "streaks": rng.choice(["absent", "regular", "irregular"]),
                "pigmentation": rng.choice(
                    ["absent", "diffuse regular", "localized irregular", "diffuse irregular", "localized regular"]
                ),
                "regression_structures": rng.choice(["absent", "blue areas", "white areas", "combinations"]),
                "dots_and_globules": rng.choice(["absent", "regular", "irregular"]),
                "blue_whitish_veil": "present" if score > 4 else "absent",
                "vascular_structures": rng.choice(
                    [
                        "absent",
                        "arborizing",
                        "comma",
                        "hairpin",
                        "within regression",
                        "wreath",
                        "dotted",
                        "linear irregular",
                    ]
                ),
                "level_of_diagnostic_difficulty": rng.choice(["low", "medium", "high"]),
                "elevation": elevation,
                "location": location,
                "sex": sex,
                "management": "excision"
                if cls in ("BCC", "MEL")
                else rng.choice(["clinical follow up", "no further examination"]),
                "clinic": clinic_rel,
                "derm": derm_rel,
                "case_id": f"{folder}{i + 1:03d}",
                "notes": "",
            }
        )
        labels[str(i + 1)] = int(y[i])
        missing[str(i + 1)] = miss
    pd.DataFrame(rows, columns=DERM7PT_COLUMNS).to_csv(os.path.join(rel, "meta", "meta.csv"), index=False)
    # native split sizes 413/203/395 of 1011, 0-based row positions
    perm = rng.permutation(n)
    n_train, n_valid = int(round(n * 413 / 1011)), int(round(n * 203 / 1011))
    parts = {"train": perm[:n_train], "valid": perm[n_train : n_train + n_valid], "test": perm[n_train + n_valid :]}
    splits = {}
    for name, idx in parts.items():
        pd.DataFrame({"indexes": np.sort(idx)}).to_csv(os.path.join(rel, "meta", f"{name}_indexes.csv"), index=False)
        splits.update({str(int(j) + 1): name for j in idx})
    dropped = [(str(n), "every modality missing")]
    labels.pop(str(n))
    return _summary(labels, splits, DERM7PT_CLASSES, False, missing, ["clinic", "derm", "table"], dropped)


# ---------------------------------------------------------------------------------------------- ODIR-5K
_ODIR_KEYWORDS = {
    "N": ["normal fundus"],
    "D": [
        "mild nonproliferative retinopathy",
        "moderate non proliferative retinopathy",
        "severe nonproliferative retinopathy",
    ],
    "G": ["glaucoma"],
    "C": ["cataract"],
    "A": ["dry age-related macular degeneration", "wet age-related macular degeneration"],
    "H": ["hypertensive retinopathy"],
    "M": ["pathological myopia"],
    "O": ["epiretinal membrane", "drusen", "laser spot", "myelinated nerve fibers"],
}
_ODIR_DISEASE_P = np.array([0.30, 0.10, 0.13, 0.10, 0.08, 0.09, 0.20])  # D G C A H M O
# blob colour of each disease label (D..O), drawn at angle j * 2pi / 7 on the retina
_ODIR_COLORS = np.array(
    [[120, 10, 10], [250, 250, 210], [200, 200, 200], [240, 220, 60], [40, 10, 60], [250, 160, 120], [60, 170, 80]],
    float,
)
_ODIR_SIZES = [(512, 384), (480, 480), (640, 480), (400, 300), (560, 420)]


def _fundus(rng: np.random.Generator, evidence: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    full = size
    w, h = size[0] // 2, size[1] // 2  # drawn at half size, then upsampled
    img = Image.new("RGB", (w, h), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    cx, cy, r = w / 2, h / 2, 0.46 * min(w, h)
    base = np.array([190, 85, 35]) + rng.normal(0, 10, 3)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in base))
    disc = (cx + 0.35 * r, cy)
    draw.ellipse([disc[0] - 0.12 * r, disc[1] - 0.12 * r, disc[0] + 0.12 * r, disc[1] + 0.12 * r], fill=(240, 200, 120))
    a = 1 / (1 + np.exp(-(evidence[1:] - 1.0) * 2))  # D..O intensities in (0, 1)
    for j, aj in enumerate(a):
        if aj < 0.15:
            continue
        ang = 2 * np.pi * j / len(a)
        bx, by = cx + 0.55 * r * np.cos(ang), cy + 0.55 * r * np.sin(ang)
        br = r * (0.10 + 0.18 * aj)
        col = base * (1 - aj) + _ODIR_COLORS[j] * aj
        draw.ellipse([bx - br, by - br, bx + br, by + br], fill=tuple(int(v) for v in np.clip(col, 0, 255)))
    img = img.filter(ImageFilter.GaussianBlur(1)).resize(full, Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    haze = a[ODIR_LABELS.index("C") - 1] * 0.5  # cataract: the whole picture turns hazy
    arr = arr * (1 - haze) + 150 * haze * (arr.sum(-1, keepdims=True) > 0)
    return arr + rng.integers(-6, 7, arr.shape, dtype=np.int16)


def _make_odir(root: str, n: int, rng: np.random.Generator) -> dict[str, Any]:
    img_dir = os.path.join(root, "ODIR-5K_Training_Dataset")
    os.makedirs(img_dir)
    labels_arr = np.zeros((n, len(ODIR_LABELS)), dtype=int)
    for i in range(n):
        if i == len(ODIR_LABELS) - 1 or (i > len(ODIR_LABELS) and rng.random() < 0.3):
            labels_arr[i, 0] = 1  # normal: N alone
        else:
            k = 1 if rng.random() < 0.75 else 2
            dis = rng.choice(7, size=k, replace=False, p=_ODIR_DISEASE_P)
            if i < len(ODIR_LABELS) - 1:
                dis = np.array([i])  # every label occurs
            elif i == len(ODIR_LABELS):
                dis = np.array([0, 6])  # D and O: two keywords in one cell
            labels_arr[i, 1 + dis] = 1
    shared = 0.6 * rng.standard_normal((n, len(ODIR_LABELS)))
    absent = {int(i) for i in rng.choice(np.arange(1, n - 1), size=3, replace=False)}
    rows, labels, missing = [], {}, {}
    for i in range(n):
        pid = i
        lab = labels_arr[i]
        # each eye shows each positive label with prob 0.75, and at least one eye shows it
        show_l = (rng.random(len(lab)) < 0.75) & (lab == 1)
        show_r = ((rng.random(len(lab)) < 0.75) | ~show_l) & (lab == 1)
        if i == len(ODIR_LABELS):
            show_l = show_r = lab == 1
        # age and sex correlate with most labels (cataract/AMD older, myopia younger, ...)
        age = 52 + 8 * rng.standard_normal() + lab @ np.array([-8, 6, 6, 14, 12, 6, -12, 2])
        sex = "Male" if rng.random() < 0.5 + lab @ np.array([-0.1, 0.1, 0.15, 0, 0, 0.25, -0.25, 0]) else "Female"
        age_cell: Any = int(np.clip(round(age), 1, 95))
        sex_cell: Any = sex
        if rng.random() < 0.03:
            age_cell = None
        if rng.random() < 0.02:
            age_cell = sex_cell = None
        row = {
            "ID": pid,
            "Patient Age": age_cell,
            "Patient Sex": sex_cell,
            "Left-Fundus": f"{pid}_left.jpg",
            "Right-Fundus": f"{pid}_right.jpg",
        }
        miss: dict[str, str] = {}
        for eye, show in (("left", show_l), ("right", show_r)):
            shown = [ODIR_LABELS[j] for j in np.flatnonzero(show)]
            kws = [str(rng.choice(_ODIR_KEYWORDS[lb])) for lb in shown] or ["normal fundus"]
            sep = "\uff0c" if rng.random() < 0.85 or i == len(ODIR_LABELS) else ","
            row[f"{eye.capitalize()}-Diagnostic Keywords"] = sep.join(kws)
            gone = (i in absent and eye == ("left" if i % 2 else "right")) or i == n - 1
            if gone:
                miss[eye] = "file absent"
                continue
            ev = 2.2 * show + shared[i] + 0.7 * rng.standard_normal(len(lab))
            size = _ODIR_SIZES[int(rng.integers(len(_ODIR_SIZES)))]
            _jpeg(_fundus(rng, ev, size), os.path.join(img_dir, f"{pid}_{eye}.jpg"), quality=85)
        if i == n - 1:
            row["Patient Age"], row["Patient Sex"] = None, None
        if row["Patient Age"] is None and row["Patient Sex"] is None:
            miss["table"] = "empty"
        row.update({lb: int(v) for lb, v in zip(ODIR_LABELS, lab)})
        rows.append(row)
        labels[str(pid)] = [int(v) for v in lab]
        missing[str(pid)] = miss
    cols = [
        "ID",
        "Patient Age",
        "Patient Sex",
        "Left-Fundus",
        "Right-Fundus",
        "Left-Diagnostic Keywords",
        "Right-Diagnostic Keywords",
        *ODIR_LABELS,
    ]
    pd.DataFrame(rows, columns=cols).to_excel(
        os.path.join(root, ODIR_ANNOTATION_FILE), sheet_name="Sheet1", index=False
    )
    dropped = [(str(n - 1), "every modality missing")]
    labels.pop(str(n - 1))
    splits = stratified_split(list(labels), ["".join(map(str, v)) for v in labels.values()], DEFAULT_FRACTIONS, 0)
    return _summary(labels, splits, ODIR_LABELS, True, missing, ["left", "right", "table"], dropped)


# ---------------------------------------------------------------------------------------------- MEN
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
    dz = (zz - centre[2]) * _MEN_SPACING[2] / _MEN_SPACING[0]  # distances in in-plane voxel units
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
    sx, sy, sz = _MEN_SPACING
    for k in range(vol.shape[2]):
        sop_uid = generate_uid(entropy_srcs=[f"cmml-synthetic-sop-{case_num}-{seq}-{k}"])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(os.path.join(folder, f"{k + 1:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
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
        pydicom.dcmwrite(ds.filename, ds, enforce_file_format=True)


def _make_men(root: str, n: int, rng: np.random.Generator, shape: tuple[int, int, int], dicom: bool) -> dict[str, Any]:
    import nibabel as nib

    os.makedirs(root, exist_ok=True)
    y = (rng.random(n) < 0.4).astype(int)
    y[:2] = [0, 1]
    views = _views(rng, np.eye(2)[y], len(MEN_SEQUENCES) + 1, signal=1.6, shared=0.7, own=1.0)
    affine = np.diag([*_MEN_SPACING, 1.0])
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
            p_high = float(_softmax(views[s_idx][i], 1.5)[1])
            vol = _men_volume(rng, seq, p_high, shape, centre)
            if dicom:
                _write_dicom_series(os.path.join(case_dir, seq), vol, i + 1, seq, s_idx + 1)
            else:
                nib.save(nib.Nifti1Image(vol, affine), os.path.join(case_dir, f"{cid}-{seq}.nii.gz"))
        pt = _softmax(views[-1][i], 1.5)[1]
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
    return _summary(labels, splits, MEN_CLASSES, False, missing, [*MEN_SEQUENCES, "table"], dropped)


# ---------------------------------------------------------------------------------------------- entry points
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
            summary = _make_derm7pt(tmp, n, rng)
        elif dataset == "odir":
            summary = _make_odir(tmp, n, rng)
        else:
            summary = _make_men(tmp, n, rng, tuple(params["shape"]), params["dicom"])
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
