"""Synthetic Derm7pt: ``release_v0/meta/meta.csv``, the split index files and the clinic/derm JPEGs.

Example:
    >>> counts = make_derm7pt(tmp_dir, 40, np.random.default_rng([0, 0]))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from cmml_monai.data.adapters.derm7pt import DERM7PT_CLASSES, DERM7PT_COLUMNS
from cmml_monai.data.synthetic.common import class_views, manifest_counts, softmax, write_jpeg

__all__ = ["make_derm7pt"]

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
    img = img.filter(ImageFilter.GaussianBlur(1.2)).resize((768, 512), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    if modality == "derm":
        arr = arr * _vignette()
    return arr + rng.integers(-8, 9, arr.shape, dtype=np.int16)


def _derm_clinical(rng: np.random.Generator, v_table: np.ndarray, cls: str, last: bool) -> tuple[str, str, str]:
    """(elevation, location, sex) of one case: the table's share of the class evidence, some cells empty."""
    elev_cls = int(np.argmax(v_table + rng.gumbel(size=len(v_table)) * 0.7))
    elevation = _DERM_ELEVATION[_DERM_ELEV_OF[elev_cls]] if rng.random() > 0.15 else rng.choice(_DERM_ELEVATION)
    location = _DERM_LOCATION[_DERM_LOC_OF[elev_cls]] if rng.random() > 0.35 else rng.choice(_DERM_LOCATION)
    sex = "male" if rng.random() < (0.6 if cls in ("BCC", "MEL") else 0.45) else "female"
    if rng.random() < 0.04:
        location = ""
    if rng.random() < 0.03:
        elevation = ""
    if rng.random() < 0.03:  # a row without any clinical value: the table modality is missing
        elevation = location = sex = ""
    if last:
        elevation = location = sex = ""
    return elevation, location, sex


def _derm_row(
    rng: np.random.Generator, i: int, folder: str, cls: str, score: int, clinical: tuple[str, str, str]
) -> dict[str, Any]:
    """The meta.csv row of case ``i`` (without its image paths), its dermoscopic criteria drawn at random."""
    elevation, location, sex = clinical
    return {
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
        "case_id": f"{folder}{i + 1:03d}",
        "notes": "",
    }


def _derm_case(
    rng: np.random.Generator,
    rel: str,
    i: int,
    cls: str,
    views: tuple[np.ndarray, np.ndarray, np.ndarray],
    same: bool,
    derm_absent: bool,
    last: bool,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Write case ``i``'s images; (its meta.csv row, modality -> why it is missing)."""
    v_clinic, v_derm, v_table = views
    folder = _DERM_FOLDERS[i % len(_DERM_FOLDERS)]
    os.makedirs(os.path.join(rel, "images", folder), exist_ok=True)
    ext_c = ".JPG" if i % 3 == 0 else ".jpg"
    clinic_rel = f"{folder}/{folder}{2 * i:03d}{ext_c}"
    derm_rel = f"{folder}/{folder.lower().capitalize()}{2 * i + 1:03d}.jpg"
    pt = softmax(v_table, 1.5)
    clinical = _derm_clinical(rng, v_table, cls, last)
    miss = {}
    if same:
        clinic_rel = derm_rel
        miss["clinic"] = "clinic == derm"
    else:
        write_jpeg(_derm_image(rng, softmax(v_clinic, 1.5), "clinic"), os.path.join(rel, "images", clinic_rel))
    if derm_absent:
        miss["derm"] = "file absent"
    else:
        write_jpeg(_derm_image(rng, softmax(v_derm, 1.5), "derm"), os.path.join(rel, "images", derm_rel))
    if not any(clinical):
        miss["table"] = "empty"
    score = int(np.clip(round(pt[DERM7PT_CLASSES.index("MEL")] * 6 + rng.normal(0, 1)), 0, 9))
    row = _derm_row(rng, i, folder, cls, score, clinical)
    row.update(clinic=clinic_rel, derm=derm_rel)
    return row, miss


def _derm_splits(rng: np.random.Generator, meta: str, n: int) -> dict[str, str]:
    """Write the split index files (native split sizes 413/203/395 of 1011, 0-based row positions)."""
    perm = rng.permutation(n)
    n_train, n_valid = int(round(n * 413 / 1011)), int(round(n * 203 / 1011))
    parts = {"train": perm[:n_train], "valid": perm[n_train : n_train + n_valid], "test": perm[n_train + n_valid :]}
    splits = {}
    for name, idx in parts.items():
        pd.DataFrame({"indexes": np.sort(idx)}).to_csv(os.path.join(meta, f"{name}_indexes.csv"), index=False)
        splits.update({str(int(j) + 1): name for j in idx})
    return splits


def make_derm7pt(root: str, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """Write ``n`` Derm7pt cases under ``root``; the manifest counts (:func:`manifest_counts`).

    Natural missingness: ~6% clinic == derm, two absent derm files, some empty table cells, and the last
    case has nothing (clinic == derm, derm absent, empty table) so the adapter drops it.

    Example:
        >>> make_derm7pt(tmp_dir, 40, np.random.default_rng([0, 0]))["n_cases"]  # doctest: +SKIP
        39
    """
    rel = os.path.join(root, "release_v0")
    os.makedirs(os.path.join(rel, "meta"))
    y = rng.choice(len(DERM7PT_CLASSES), size=n, p=_DERM_PRIOR)
    y[: len(DERM7PT_CLASSES)] = np.arange(len(DERM7PT_CLASSES))  # every class occurs
    onehot = np.eye(len(DERM7PT_CLASSES))[y]
    v_clinic, v_derm, v_table = class_views(rng, onehot, 3, signal=2.5, shared=0.6, own=1.0)
    same = rng.random(n) < 0.06
    same[0], same[n - 1] = True, True
    absent_derm = {int(i) for i in rng.choice(np.arange(1, n - 1), size=2, replace=False)} | {n - 1}
    rows, labels, missing = [], {}, {}
    for i in range(n):
        views = (v_clinic[i], v_derm[i], v_table[i])
        cls = DERM7PT_CLASSES[int(y[i])]
        row, missing[str(i + 1)] = _derm_case(rng, rel, i, cls, views, bool(same[i]), i in absent_derm, i == n - 1)
        rows.append(row)
        labels[str(i + 1)] = int(y[i])
    pd.DataFrame(rows, columns=DERM7PT_COLUMNS).to_csv(os.path.join(rel, "meta", "meta.csv"), index=False)
    splits = _derm_splits(rng, os.path.join(rel, "meta"), n)
    dropped = [(str(n), "every modality missing")]
    labels.pop(str(n))
    return manifest_counts(labels, splits, DERM7PT_CLASSES, False, missing, ["clinic", "derm", "table"], dropped)
