"""Synthetic ODIR-5K: the annotation workbook and one fundus JPEG per eye.

Example:
    >>> counts = make_odir(tmp_dir, 40, np.random.default_rng([0, 1]))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from cmml_monai.data.adapters.odir import ODIR_ANNOTATION_FILE, ODIR_COLUMNS, ODIR_LABELS
from cmml_monai.data.adapters.splits import DEFAULT_FRACTIONS, stratified_split
from cmml_monai.data.synthetic.common import manifest_counts, write_jpeg

__all__ = ["make_odir"]

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
    img = img.filter(ImageFilter.GaussianBlur(1)).resize(full, Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    haze = a[ODIR_LABELS.index("C") - 1] * 0.5  # cataract: the whole picture turns hazy
    arr = arr * (1 - haze) + 150 * haze * (arr.sum(-1, keepdims=True) > 0)
    return arr + rng.integers(-6, 7, arr.shape, dtype=np.int16)


def _odir_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 8]`` 0/1 labels (N D G C A H M O): every label occurs, case 8 has D and O, N stands alone."""
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
    return labels_arr


def _odir_patient(rng: np.random.Generator, pid: int, lab: np.ndarray) -> dict[str, Any]:
    """The patient's cells (age and sex correlate with most labels: cataract/AMD older, myopia younger, ...)."""
    age = 52 + 8 * rng.standard_normal() + lab @ np.array([-8, 6, 6, 14, 12, 6, -12, 2])
    sex = "Male" if rng.random() < 0.5 + lab @ np.array([-0.1, 0.1, 0.15, 0, 0, 0.25, -0.25, 0]) else "Female"
    age_cell: Any = int(np.clip(round(age), 1, 95))
    sex_cell: Any = sex
    if rng.random() < 0.03:
        age_cell = None
    if rng.random() < 0.02:
        age_cell = sex_cell = None
    return {
        "ID": pid,
        "Patient Age": age_cell,
        "Patient Sex": sex_cell,
        "Left-Fundus": f"{pid}_left.jpg",
        "Right-Fundus": f"{pid}_right.jpg",
    }


def _odir_case(
    rng: np.random.Generator, img_dir: str, i: int, n: int, lab: np.ndarray, shared: np.ndarray, absent: set[int]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Write case ``i``'s fundus images; (its workbook row, modality -> why it is missing)."""
    pid = i
    # each eye shows each positive label with prob 0.75, and at least one eye shows it
    show_l = (rng.random(len(lab)) < 0.75) & (lab == 1)
    show_r = ((rng.random(len(lab)) < 0.75) | ~show_l) & (lab == 1)
    if i == len(ODIR_LABELS):
        show_l = show_r = lab == 1
    row = _odir_patient(rng, pid, lab)
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
        ev = 2.2 * show + shared + 0.7 * rng.standard_normal(len(lab))
        size = _ODIR_SIZES[int(rng.integers(len(_ODIR_SIZES)))]
        write_jpeg(_fundus(rng, ev, size), os.path.join(img_dir, f"{pid}_{eye}.jpg"), quality=85)
    if i == n - 1:
        row["Patient Age"], row["Patient Sex"] = None, None
    if row["Patient Age"] is None and row["Patient Sex"] is None:
        miss["table"] = "empty"
    row.update({lb: int(v) for lb, v in zip(ODIR_LABELS, lab)})
    return row, miss


def make_odir(root: str, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """Write ``n`` ODIR-5K cases under ``root``; the manifest counts (:func:`manifest_counts`).

    Three cases lack one eye's file and the last case has nothing (the adapter drops it).

    Example:
        >>> make_odir(tmp_dir, 40, np.random.default_rng([0, 1]))["n_cases"]  # doctest: +SKIP
        39
    """
    img_dir = os.path.join(root, "ODIR-5K_Training_Dataset")
    os.makedirs(img_dir)
    labels_arr = _odir_labels(rng, n)
    shared = 0.6 * rng.standard_normal((n, len(ODIR_LABELS)))
    absent = {int(i) for i in rng.choice(np.arange(1, n - 1), size=3, replace=False)}
    rows, labels, missing = [], {}, {}
    for i in range(n):
        row, missing[str(i)] = _odir_case(rng, img_dir, i, n, labels_arr[i], shared[i], absent)
        rows.append(row)
        labels[str(i)] = [int(v) for v in labels_arr[i]]
    pd.DataFrame(rows, columns=ODIR_COLUMNS).to_excel(
        os.path.join(root, ODIR_ANNOTATION_FILE), sheet_name="Sheet1", index=False
    )
    dropped = [(str(n - 1), "every modality missing")]
    labels.pop(str(n - 1))
    splits = stratified_split(list(labels), ["".join(map(str, v)) for v in labels.values()], DEFAULT_FRACTIONS, 0)
    return manifest_counts(labels, splits, ODIR_LABELS, True, missing, ["left", "right", "table"], dropped)
