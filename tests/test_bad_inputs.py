"""Catalogue of bad inputs: each case is a real file written here and read by a real adapter / reader.

Every test asserts either the clear error (the file, column or case, and what to do) or the documented
handling, and that nothing half-written is left (no ``.tmp-*`` file, no split file from a failed load).
Image problems are found by the preflight (:mod:`cmml_monai.data.preflight`) before any training, with
every bad file of every split in one error.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from cmml_monai.data.adapters import load_dataset
from cmml_monai.data.adapters.derm7pt import DERM7PT_COLUMNS
from cmml_monai.data.dataset import build_dataset
from cmml_monai.data.errors import DataError
from cmml_monai.data.preflight import run_preflight
from cmml_monai.data.readers import load_image
from cmml_monai.data.setup import load_cases
from cmml_monai.data.table import TableSchema
from cmml_monai.metrics import macro_auc

SPLITS = ("train", "valid", "test")
DIAGNOSES = ["basal cell carcinoma", "clark nevus", "melanoma", "lentigo", "seborrheic keratosis"]
PYDICOM_DATA = os.path.dirname(get_testdata_file("MR_small.dcm"))
CT5N = os.path.join(PYDICOM_DATA, "dicomdirtests", "98892001", "CT5N")
CT2N = os.path.join(PYDICOM_DATA, "dicomdirtests", "98892001", "CT2N")


# ------------------------------------------------------------------------------------------ layouts
def _photo(path, seed: int = 0, size=(32, 24), mode: str = "RGB") -> str:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3)).astype(np.uint8)
    img = Image.fromarray(arr)
    img = img.convert(mode) if mode != "RGB" else img
    img.save(path, **({"quality": 90} if str(path).lower().endswith((".jpg", ".jpeg")) else {}))
    return str(path)


def derm_layout(root, n: int = 15) -> str:
    """A Derm7pt ``release_v0`` folder: every split holds every class (split = i % 3, class = i % 5)."""
    rel = os.path.join(str(root), "release_v0")
    os.makedirs(os.path.join(rel, "meta"))
    os.makedirs(os.path.join(rel, "images", "F"))
    rows = []
    for i in range(n):
        clinic, derm = f"F/c{i}.jpg", f"F/d{i}.png" if i % 4 == 3 else f"F/d{i}.jpg"
        _photo(os.path.join(rel, "images", clinic), 2 * i)
        _photo(os.path.join(rel, "images", derm), 2 * i + 1)
        row = dict.fromkeys(DERM7PT_COLUMNS, "")
        row.update(
            case_num=i + 1,
            diagnosis=DIAGNOSES[i % 5],
            seven_point_score=i % 4,
            elevation="flat",
            location="back",
            sex="fm"[i % 2],
            clinic=clinic,
            derm=derm,
            case_id=f"X{i}",
        )
        rows.append(row)
    pd.DataFrame(rows, columns=DERM7PT_COLUMNS).to_csv(os.path.join(rel, "meta", "meta.csv"), index=False)
    for s, split in enumerate(SPLITS):
        pd.DataFrame({"indexes": list(range(s, n, 3))}).to_csv(
            os.path.join(rel, "meta", f"{split}_indexes.csv"), index=False
        )
    return str(root)


def men_layout(root, n: int = 9, shape=(8, 8, 6)) -> str:
    """A MEN folder: ``<case>/<case>-t1c.nii.gz`` and ``-t2w``, ``clinical.csv`` with a split column."""
    root = str(root)
    os.makedirs(root)
    rows = []
    for i in range(n):
        os.makedirs(os.path.join(root, f"c{i}"))
        for j, seq in enumerate(("t1c", "t2w")):
            vol = np.random.default_rng(10 * i + j).random(shape).astype(np.float32)
            path = os.path.join(root, f"c{i}", f"c{i}-{seq}.nii.gz")
            nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), path)
        rows.append(
            {"case_id": f"c{i}", "grade": 1 + i % 2, "age": 40.0 + i, "sex": "FM"[i % 2], "split": SPLITS[i % 3]}
        )
    pd.DataFrame(rows).to_csv(os.path.join(root, "clinical.csv"), index=False)
    return root


MEN_OPTS = {"sequences": ["t1c", "t2w"]}


def _meta(root) -> str:
    return os.path.join(str(root), "release_v0", "meta", "meta.csv")


def _image(root, name: str) -> str:
    return os.path.join(str(root), "release_v0", "images", "F", name)


def assert_nothing_half_written(*folders) -> None:
    for folder in folders:
        left = [
            p
            for p in glob.glob(os.path.join(str(folder), "**", "*"), recursive=True)
            if os.path.basename(p).startswith(".tmp-") or p.endswith((".tmp", ".part"))
        ]
        assert not left, left


@pytest.fixture(autouse=True)
def _no_partial_files_left(tmp_path):
    """After every case: no temporary file of an interrupted atomic write anywhere under the test's folder."""
    yield
    assert_nothing_half_written(tmp_path)


def preflight(case_list, out, size=(16, 16), mode: str = "fail"):
    """The bundle's preflight over the three splits (in-memory cache: the fill is the check)."""
    schema = None
    if case_list.has_table:
        schema = TableSchema.fit(
            [c.table for c in case_list.split("train")], case_list.table_columns, case_list.table_types
        )
    datasets = {
        s: build_dataset(case_list, s, schema, spatial_size=size, cache="cache", defer_errors=True) for s in SPLITS
    }
    return run_preflight(case_list, datasets, mode, num_workers=2, output_dir=out, progress=False), datasets


def expect_preflight_error(case_list, out, size=(16, 16)) -> str:
    with pytest.raises(DataError) as raised:
        preflight(case_list, out, size)
    msg = str(raised.value)
    report = json.loads(open(os.path.join(str(out), "preflight.json")).read())  # complete JSON
    assert msg.startswith(f"preflight: {len(report['problems'])} problem(s)")
    assert_nothing_half_written(out)
    return msg


# ------------------------------------------------------------------------------------------ 2D images
def _truncate(path):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


def _zero(path):
    open(path, "wb").close()


def _garble_header(path):
    raw = bytearray(open(path, "rb").read())
    raw[2:40] = b"\x13" * 38  # JPEG: SOI then garbage; PNG: signature and IHDR destroyed
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize(
    "name, damage, words",
    [
        ("d0.jpg", _truncate, "truncated"),
        ("d0.jpg", _zero, "cannot identify"),
        ("d0.jpg", _garble_header, "cannot"),
        ("d3.png", _truncate, "cannot"),
        ("d3.png", _zero, "cannot identify"),
        ("d3.png", _garble_header, "cannot identify"),
    ],
    ids=["truncated-jpeg", "zero-byte-jpeg", "corrupt-jpeg", "truncated-png", "zero-byte-png", "corrupt-png"],
)
def test_broken_photo_stops_before_training_naming_case_and_file(tmp_path, name, damage, words):
    root = derm_layout(tmp_path / "derm")
    damage(_image(root, name))
    case_list = load_dataset("derm7pt", root)
    msg = expect_preflight_error(case_list, tmp_path / "out")
    case = str(int(name[1:-4]) + 1)
    line = next(x for x in msg.splitlines() if _image(root, name) in x)
    assert f"case {case}, modality derm: {_image(root, name)}: cannot read the image" in line
    assert words in line.lower() and "replace it or mark the modality missing" in line


def test_every_broken_file_of_every_split_in_one_error(tmp_path):
    root = derm_layout(tmp_path / "derm")
    for name, damage in (("d0.jpg", _truncate), ("c1.jpg", _zero), ("d5.jpg", _garble_header)):
        damage(_image(root, name))  # cases 1 (train), 2 (valid), 6 (test)
    msg = expect_preflight_error(load_dataset("derm7pt", root), tmp_path / "out")
    assert msg.splitlines()[0].startswith("preflight: 3 problem(s) in 3 case(s) of 15 checked")
    assert {x.split("]")[0].strip() + "]" for x in msg.splitlines()[1:]} == {"[train]", "[valid]", "[test]"}


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_grayscale_rgba_palette_cmyk_photo_converted_to_rgb(tmp_path, mode):
    """Documented handling: any PIL mode is converted to 3-channel RGB."""
    ext = ".jpg" if mode in ("L", "CMYK") else ".png"
    path = _photo(tmp_path / f"x{ext}", 3, size=(20, 10), mode=mode)
    img = load_image(path, "image2d")
    assert tuple(img.shape) == (3, 10, 20)
    if mode == "L":
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    ref = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    assert np.allclose(img.numpy(), ref)


def test_very_large_photo_is_decoded_at_reduced_scale_with_bounded_memory(tmp_path):
    """A 6000x4000 JPEG ends as the configured size; decoding it grows peak RSS by well under its full
    float32 size (288 MB), in a fresh process so that earlier tests' peaks do not hide the growth."""
    path = str(tmp_path / "big.jpg")
    small = np.random.default_rng(0).integers(0, 256, size=(200, 300, 3)).astype(np.uint8)
    Image.fromarray(small).resize((6000, 4000)).save(path, quality=80)
    _photo(tmp_path / "warm.jpg")
    code = (
        "import resource, sys, json\n"
        "from cmml_monai.data.readers import load_image\n"
        "from cmml_monai.data.transforms import image_transforms\n"
        "chain = image_transforms('image2d', (64, 64))\n"
        "chain(load_image(sys.argv[2], 'image2d'))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = chain(load_image(sys.argv[1], 'image2d'))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'shape': list(out.shape), 'growth_mb': (after - before) / 1024}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, path, str(tmp_path / "warm.jpg")], capture_output=True, text=True, timeout=120
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [3, 64, 64]
    assert result["growth_mb"] < 150, result  # full-resolution decoding measured ~450 MB


# ------------------------------------------------------------------------------------------ 3D images
def _men_slices(folder, positions, template="MR_small.dcm", pixels: bool = True) -> str:
    os.makedirs(folder)
    src = pydicom.dcmread(get_testdata_file(template))
    uid = generate_uid()
    for i, z in enumerate(positions):
        ds = src.copy()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber, ds.ImagePositionPatient = i + 1, [0.0, 0.0, float(z)]
        if not pixels:
            del ds.PixelData
        ds.save_as(os.path.join(str(folder), f"s{i}.dcm"))
    return str(folder)


def _replace_sequence(root, case: str, seq: str) -> str:
    os.remove(os.path.join(root, case, f"{case}-{seq}.nii.gz"))
    return os.path.join(root, case, seq)


@pytest.mark.parametrize(
    "what, expect",
    [
        ("nifti-4d", "expected a 3D volume but the image has shape (8, 8, 6, 2); split multi-volume (4D) files"),
        ("nifti-2d", "expected a 3D volume but the NIfTI file is 2D with shape (8, 8); provide the whole volume"),
        ("dicom-no-pixels", "DICOM file without pixel data (modality MR); point the path at the image series"),
        ("dicom-several-series", "holds 2 DICOM series"),
        ("dicom-uneven-slices", "slices of the DICOM series are not evenly spaced (gaps 2 to 4 mm)"),
    ],
)
def test_bad_volume_stops_before_training_naming_case_and_file(tmp_path, what, expect):
    root = men_layout(tmp_path / "men")
    nifti = os.path.join(root, "c4", "c4-t2w.nii.gz")
    if what == "nifti-4d":
        nib.save(nib.Nifti1Image(np.ones((8, 8, 6, 2), np.float32), np.eye(4)), nifti)
        bad = nifti
    elif what == "nifti-2d":
        nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), nifti)
        bad = nifti
    elif what == "dicom-no-pixels":
        bad = _men_slices(_replace_sequence(root, "c4", "t2w"), [0.0], pixels=False)
        bad = os.path.join(bad, "s0.dcm")
    elif what == "dicom-several-series":
        bad = _replace_sequence(root, "c4", "t2w")
        os.makedirs(bad)
        for src in (CT5N, CT2N):
            for f in glob.glob(os.path.join(src, "*")):
                shutil.copy(f, os.path.join(bad, f"{os.path.basename(src)}_{os.path.basename(f)}.dcm"))
    else:
        bad = _men_slices(_replace_sequence(root, "c4", "t2w"), [0, 2, 4, 8, 10, 12])
    case_list = load_dataset("men", root, **MEN_OPTS)
    msg = expect_preflight_error(case_list, tmp_path / "out", size=(8, 8, 6))
    assert len(msg.splitlines()) == 2
    line = msg.splitlines()[1]
    assert line.startswith("  [valid] case c4, modality t2w: ") and bad in line and expect in line


def test_even_dicom_series_and_single_slice_pass(tmp_path):
    """Control for the checks above: an evenly spaced series and one slice (a depth-1 volume) are accepted."""
    even = _men_slices(tmp_path / "even", [0, 2, 4, 6])
    assert tuple(load_image(even, "image3d").shape) == (1, 64, 64, 4)
    one = _men_slices(tmp_path / "one", [0])
    assert tuple(load_image(one, "image3d", reader="pydicom").shape) == (1, 64, 64, 1)


# ------------------------------------------------------------------------------------------ tables
def test_csv_with_utf8_bom_is_read(tmp_path):
    root = derm_layout(tmp_path / "derm")
    meta = pd.read_csv(_meta(root))
    meta.to_csv(_meta(root), index=False, encoding="utf-8-sig")
    assert open(_meta(root), "rb").read(3) == b"\xef\xbb\xbf"
    assert [c.case_id for c in load_dataset("derm7pt", root).cases][:3] == ["1", "2", "3"]


def test_latin1_csv_refused_with_line_and_fix(tmp_path):
    root = derm_layout(tmp_path / "derm")
    meta = pd.read_csv(_meta(root))
    meta.loc[4, "location"] = "épaule"
    meta.to_csv(_meta(root), index=False, encoding="latin-1")
    with pytest.raises(DataError, match=r"meta.csv: not UTF-8 text \(byte b'\\xe9' on line 6.*save the table as UTF-8"):
        load_dataset("derm7pt", root)


def test_semicolon_csv_with_decimal_commas_is_read(tmp_path):
    """Documented handling: a ';'-separated table (European Excel) is read with ',' as the decimal mark."""
    root = men_layout(tmp_path / "men")
    table = pd.read_csv(os.path.join(root, "clinical.csv"))
    table.loc[0, "age"] = 61.5
    table.to_csv(os.path.join(root, "clinical.csv"), index=False, sep=";", decimal=",")
    assert "61,5" in open(os.path.join(root, "clinical.csv")).read()
    cases = {c.case_id: c for c in load_dataset("men", root, **MEN_OPTS).cases}
    assert cases["c0"].table == {"age": 61.5, "sex": "F"} and len(cases) == 9


def test_duplicated_ids_refused_naming_column_and_ids(tmp_path):
    root = men_layout(tmp_path / "men")
    split_file = tmp_path / "out" / "split.json"
    table = pd.read_csv(os.path.join(root, "clinical.csv")).drop(columns=["split"])
    table.loc[5, "case_id"] = "c2"
    table.to_csv(os.path.join(root, "clinical.csv"), index=False)
    with pytest.raises(DataError, match=r"clinical.csv: duplicated case ids in column 'case_id': \['c2'\]"):
        load_dataset("men", root, split_file=str(split_file), **MEN_OPTS)
    assert not split_file.exists()
    assert_nothing_half_written(tmp_path)


def test_ids_in_table_but_not_on_disk_and_the_reverse(tmp_path):
    """Documented handling: a table row without files keeps its table (images missing, reason given); a case
    folder without a table row is dropped with its reason; a listed photo that is absent is 'file absent'."""
    root = men_layout(tmp_path / "men")
    shutil.rmtree(os.path.join(root, "c3"))
    os.makedirs(os.path.join(root, "stray"))
    case_list = load_dataset("men", root, **MEN_OPTS)
    c3 = next(c for c in case_list.cases if c.case_id == "c3")
    assert c3.paths == {"t1c": None, "t2w": None} and set(c3.missing_reason.values()) == {"case folder absent"}
    assert ("stray", "not in clinical table") in case_list.dropped
    derm = derm_layout(tmp_path / "derm")
    os.remove(_image(derm, "c7.jpg"))
    case8 = next(c for c in load_dataset("derm7pt", derm).cases if c.case_id == "8")
    assert case8.paths["clinic"] is None and case8.missing_reason == {"clinic": "file absent"}


def test_nan_and_inf_in_numeric_column_become_missing_cells(tmp_path):
    root = men_layout(tmp_path / "men")
    table = pd.read_csv(os.path.join(root, "clinical.csv"))
    table["age"] = table["age"].astype(object)
    table.loc[0, "age"], table.loc[3, "age"], table.loc[6, "age"] = "inf", float("nan"), "-inf"
    table.to_csv(os.path.join(root, "clinical.csv"), index=False)
    case_list = load_dataset("men", root, **MEN_OPTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schema = TableSchema.fit([c.table for c in case_list.split("train")], ["age", "sex"], case_list.table_types)
    assert any("'age'" in str(w.message) and "not numbers" in str(w.message) for w in caught)
    age = schema.columns[0]
    assert np.isfinite(age.mean) and np.isfinite(age.std)
    rows = {c.case_id: c.table for c in case_list.cases}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(schema.encode(rows["c0"])[0]) and np.isnan(schema.encode(rows["c3"])[0])
        assert np.isfinite(schema.encode(rows["c1"])).all()


def test_empty_label_cell(tmp_path):
    """Derm7pt: an empty diagnosis is an error naming the case; MEN: an empty grade drops the case."""
    root = derm_layout(tmp_path / "derm")
    meta = pd.read_csv(_meta(root))
    meta.loc[6, "diagnosis"] = np.nan
    meta.to_csv(_meta(root), index=False)
    with pytest.raises(DataError, match=r"meta.csv: case 7: the diagnosis \(label\) column is empty; fill it"):
        load_dataset("derm7pt", root)
    men = men_layout(tmp_path / "men")
    table = pd.read_csv(os.path.join(men, "clinical.csv"))
    table.loc[2, "grade"] = np.nan
    table.to_csv(os.path.join(men, "clinical.csv"), index=False)
    assert ("c2", "grade empty") in load_dataset("men", men, **MEN_OPTS).dropped


def test_unknown_label_refused_naming_case_and_value(tmp_path):
    root = derm_layout(tmp_path / "derm")
    meta = pd.read_csv(_meta(root))
    meta.loc[9, "diagnosis"] = "unicorn nevus"
    meta.to_csv(_meta(root), index=False)
    with pytest.raises(DataError, match=r"case 10: diagnosis 'unicorn nevus' is not a known Derm7pt diagnosis"):
        load_dataset("derm7pt", root)


def test_xlsx_with_extra_sheets(tmp_path):
    """The first sheet is read unless ``sheet`` names another; when it lacks the columns the error lists the
    sheets and says to set the option."""
    root = men_layout(tmp_path / "men")
    table = pd.read_csv(os.path.join(root, "clinical.csv"))
    os.remove(os.path.join(root, "clinical.csv"))
    with pd.ExcelWriter(os.path.join(root, "clinical.xlsx")) as writer:
        pd.DataFrame({"note": ["exported 2024"]}).to_excel(writer, sheet_name="README", index=False)
        table.to_excel(writer, sheet_name="patients", index=False)
        table.head(2).to_excel(writer, sheet_name="old", index=False)
    with pytest.raises(
        DataError,
        match=r"clinical.xlsx: missing required column 'case_id'.* in sheet 0 of sheets "
        r"\['README', 'patients', 'old'\]: set the sheet option",
    ):
        load_dataset("men", root, **MEN_OPTS)
    assert len(load_dataset("men", root, sheet="patients", **MEN_OPTS).cases) == 9


def test_split_files_pointing_past_the_table(tmp_path):
    root = derm_layout(tmp_path / "derm")
    pd.DataFrame({"indexes": [2, 15]}).to_csv(os.path.join(root, "release_v0", "meta", "test_indexes.csv"), index=False)
    with pytest.raises(DataError, match=r"test_indexes.csv: index 15 is outside meta.csv's 15 rows"):
        load_dataset("derm7pt", root)
    men = men_layout(tmp_path / "men")
    table = pd.read_csv(os.path.join(men, "clinical.csv")).drop(columns=["split"])
    table.to_csv(os.path.join(men, "clinical.csv"), index=False)
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"splits": {f"c{i}": "train" for i in range(5)}}))
    with pytest.raises(DataError, match=r"split.json: split file does not cover 4 case\(s\), e.g. 'c5'; delete it"):
        load_dataset("men", men, split_file=str(split_file), **MEN_OPTS)
    assert json.loads(split_file.read_text())["splits"]["c0"] == "train"  # left as it was
    assert_nothing_half_written(tmp_path)


def test_dataset_empty_after_filtering(tmp_path):
    root = men_layout(tmp_path / "men")
    table = pd.read_csv(os.path.join(root, "clinical.csv"))
    table["grade"] = np.nan
    table.to_csv(os.path.join(root, "clinical.csv"), index=False)
    with pytest.raises(
        DataError,
        match=r"has no 'train' cases; every split is needed \(dropped: "
        r"\{'grade empty': 9\}; 0 usable cases\)",
    ):
        load_cases("men", root, options=MEN_OPTS)


def test_case_with_every_modality_missing_is_dropped_with_reason(tmp_path):
    root = derm_layout(tmp_path / "derm")
    for name in ("c4.jpg", "d4.jpg"):
        os.remove(_image(root, name))
    meta = pd.read_csv(_meta(root))
    meta.loc[4, ["elevation", "location", "sex"]] = np.nan
    meta.to_csv(_meta(root), index=False)
    case_list = load_dataset("derm7pt", root)
    assert ("5", "every modality missing") in case_list.dropped and "5" not in [c.case_id for c in case_list.cases]


def test_class_absent_from_validation_is_warned_and_skipped(tmp_path, caplog):
    root = derm_layout(tmp_path / "derm")
    meta = pd.read_csv(_meta(root))
    sk = [i for i in range(1, 15, 3) if meta.loc[i, "diagnosis"] == "seborrheic keratosis"]
    meta.loc[sk, "diagnosis"] = "lentigo"  # the valid split's only SK case becomes MISC
    meta.to_csv(_meta(root), index=False)
    case_list = load_dataset("derm7pt", root)
    caplog.set_level("WARNING")
    report, _ = preflight(case_list, tmp_path / "out")
    assert report.warnings == [
        "valid split: no case of class(es) ['SK']; its AUC averages over the other classes (move some cases into it)"
    ]
    assert "no case of class(es) ['SK']" in caplog.text
    labels = [c.label for c in case_list.split("valid")]
    probs = np.eye(5)[labels] * 0.6 + 0.08
    auc, skipped = macro_auc(probs, labels)
    assert skipped == [4] and auc == 1.0


# ----------------------------------------------------------------------------- DICOM studies (PACS path)
@pytest.fixture(scope="module")
def men_bundle(tmp_path_factory) -> str:
    from pacs_helpers import trained_men_bundle

    return trained_men_bundle(tmp_path_factory)


def _deploy(args, capsys) -> tuple[int, list[str]]:
    from cmml_monai.deploy.__main__ import main

    code = main(args)
    return code, capsys.readouterr().err.strip().splitlines()


#: Type 2 attributes absent in many exports (and in synthetic DICOM): the SR carries them empty
TYPE2_REMOVED = ["AccessionNumber", "StudyID", "StudyDate", "StudyTime", "PatientSex", "PatientBirthDate"]


@pytest.mark.parametrize("keyword", TYPE2_REMOVED)
def test_study_lacking_a_type2_attribute_gives_a_valid_sr_with_it_empty(men_bundle, tmp_path, capsys, keyword):
    from pacs_helpers import make_study

    study = make_study(str(tmp_path / "study"), ("T1c", "T2"), decoys=False)
    for files in study["series"].values():
        for f in files:
            ds = pydicom.dcmread(f)
            delattr(ds, keyword)
            ds.save_as(f)
    out = tmp_path / "out"
    code, err = _deploy([study["folder"], "--bundle", men_bundle, "--out", str(out), "--key", "k"], capsys)
    assert code == 0, err
    (sr_file,) = glob.glob(str(out / "*.sr.dcm"))
    sr = pydicom.dcmread(sr_file)
    assert keyword in sr and sr[keyword].value in ("", None)  # present (Type 2), empty
    assert sr.StudyInstanceUID == study["uid"] and sr.PatientID == "TP001"


def test_truncated_pixel_data_is_one_line_naming_the_series(men_bundle, tmp_path, capsys):
    from pacs_helpers import make_study

    study = make_study(str(tmp_path / "study"), ("T1c", "T2"), decoys=False)
    f = study["series"]["T2"][2]
    ds = pydicom.dcmread(f)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(f)
    out = tmp_path / "out"
    code, err = _deploy([study["folder"], "--bundle", men_bundle, "--out", str(out), "--key", "k"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: series 11 'T2 TSE axial' (4 files): "), err
    assert "pixel data holds 170 bytes where its header (Rows 16 x Columns 16" in err[0]
    assert not out.exists()  # no empty --out left behind


def test_header_claiming_a_huge_image_is_refused_before_reading(men_bundle, tmp_path, capsys):
    from pacs_helpers import make_study

    study = make_study(str(tmp_path / "study"), ("T1c",), decoys=False)
    f = study["series"]["T1c"][0]
    ds = pydicom.dcmread(f)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 20000, 20000, 24
    ds.save_as(f)
    code, err = _deploy([study["folder"], "--bundle", men_bundle, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err) == 1 and "Rows 20000 x Columns 20000 x 24 frame(s)" in err[0], err
    assert "needs 19200000000" in err[0]


def test_study_without_a_matching_series_is_one_error_line(men_bundle, tmp_path, capsys):
    from pacs_helpers import make_study

    study = make_study(str(tmp_path / "study"), ("T1c",), decoys=False)
    for f in study["series"]["T1c"]:
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = ds.ProtocolName = "DWI b1000"
        ds.save_as(f)
    out = tmp_path / "out"
    code, err = _deploy([study["folder"], "--bundle", men_bundle, "--out", str(out), "--case-id", "c1"], capsys)
    assert code == 2 and len(err) == 1, err
    assert (
        err[0] == "error: c1: no series matches any of ['t1c', 't1n', 't2w', 't2f']; check the series rules "
        "(--rules) or the study"
    )
    assert not out.exists()


def test_one_bad_study_of_a_folder_does_not_cost_the_others(men_bundle, tmp_path, capsys):
    from pacs_helpers import make_study

    good = make_study(str(tmp_path / "in" / "good"), ("T1c",), decoys=False)
    bad = make_study(str(tmp_path / "in" / "bad"), ("T1c",), decoys=False)
    f = bad["series"]["T1c"][0]
    ds = pydicom.dcmread(f)
    ds.PixelData = ds.PixelData[:10]
    ds.save_as(f)
    out = tmp_path / "out"
    code, err = _deploy(
        [str(tmp_path / "in"), "--each-study", "--bundle", men_bundle, "--out", str(out), "--key", "k"], capsys
    )
    assert code == 2 and err[-1].startswith(
        "error: 1 of 2 studies not processed (the others were written): series 10 'T1 MPRAGE post Gd' (4 files): "
        "a file's pixel data holds 10"
    ), err
    (sr_file,) = glob.glob(str(out / "*.sr.dcm"))
    assert pydicom.dcmread(sr_file).StudyInstanceUID == good["uid"]
