"""Dataset adapters on synthetic data in the native layouts, and their errors on bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from cmml_monai.data.adapters import adapter_options, load_dataset
from cmml_monai.data.adapters.men import parse_grade
from cmml_monai.data.adapters.odir import ODIR_ANNOTATION_FILE
from cmml_monai.data.adapters.splits import stratified_split
from cmml_monai.data.errors import DataError
from cmml_monai.data.report import summarize

DERM_N, ODIR_N, MEN_N = 24, 24, 14


def _agrees(case_list, manifest):
    s = summarize(case_list)
    for key in ("n_cases", "splits", "label_counts", "missing", "missing_reasons", "dropped"):
        assert s[key] == manifest[key], key
    # the per-split counts add up to the totals
    assert {k: b["cases"] for k, b in s["by_split"].items()} == s["splits"]
    for key in ("label_counts", "missing"):
        assert {k: sum(b[key][k] for b in s["by_split"].values()) for k in s[key]} == s[key], key


# ------------------------------------------------------------------------------------------ Derm7pt
def test_derm7pt_layout(synthetic_dataset):
    root, manifest = synthetic_dataset("derm7pt", DERM_N)
    cl = load_dataset("derm7pt", root)
    _agrees(cl, manifest)
    assert cl.modality_names == ["clinic", "derm", "table"] and cl.class_names == ["BCC", "NEV", "MEL", "MISC", "SK"]
    assert cl.table_columns == ["elevation", "location", "sex"]
    assert len(cl.cases) == DERM_N - 1 and cl.dropped == [(str(DERM_N), "every modality missing")]
    same = [c for c in cl.cases if c.missing_reason.get("clinic") == "clinic == derm"]
    assert same and all(c.paths["clinic"] is None and c.paths["derm"] for c in same)
    exts = {os.path.splitext(p)[1] for c in cl.cases for p in c.paths.values() if p}
    assert exts == {".jpg", ".JPG"}
    # index files hold 0-based positions into meta.csv
    meta = pd.read_csv(os.path.join(root, "release_v0", "meta", "meta.csv"))
    train_pos = pd.read_csv(os.path.join(root, "release_v0", "meta", "train_indexes.csv"))["indexes"]
    by_id = {c.case_id: c for c in cl.cases}
    for pos in train_pos:
        cid = str(meta["case_num"][pos])
        if cid in by_id:
            assert by_id[cid].split == "train"
    # pointing at release_v0 itself gives the same cases
    again = load_dataset("derm7pt", os.path.join(root, "release_v0"))
    assert [c.case_id for c in again.cases] == [c.case_id for c in cl.cases]


def test_derm7pt_table_options(synthetic_dataset):
    root, _ = synthetic_dataset("derm7pt", DERM_N)
    with pytest.raises(DataError, match="management.*allow_leaky_columns"):
        load_dataset("derm7pt", root, extra_table_columns=["management"])
    with pytest.warns(UserWarning, match="leak"):
        cl = load_dataset("derm7pt", root, extra_table_columns=["management"], allow_leaky_columns=True)
    assert cl.table_columns[-1] == "management"
    cl = load_dataset("derm7pt", root, extra_table_columns=["seven_point_score"])
    assert cl.table_types["seven_point_score"] == "numeric"
    no_table = load_dataset("derm7pt", root, table_columns=[])
    assert no_table.modality_names == ["clinic", "derm"]
    with pytest.raises(ValueError, match="bogus"):
        load_dataset("derm7pt", root, bogus=1)
    assert "split_file" in adapter_options("odir")


def _copy(root, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(root, dst)
    return dst


def test_derm7pt_bad_inputs(synthetic_dataset, tmp_path):
    root, _ = synthetic_dataset("derm7pt", DERM_N)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("derm7pt", str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="meta/meta.csv"):
        load_dataset("derm7pt", str(tmp_path / "empty"))
    dst = _copy(root, tmp_path)
    meta_path = os.path.join(dst, "release_v0", "meta", "meta.csv")
    meta = pd.read_csv(meta_path)
    meta.drop(columns=["location"]).to_csv(meta_path, index=False)
    with pytest.raises(DataError, match="'location'.*meta.csv|meta.csv.*'location'"):
        load_dataset("derm7pt", dst)
    bad = meta.copy()
    bad.loc[3, "diagnosis"] = "unicorn nevus"
    bad.to_csv(meta_path, index=False)
    with pytest.raises(DataError, match="case 4.*unicorn nevus"):
        load_dataset("derm7pt", dst)
    dup = meta.copy()
    dup.loc[5, "case_num"] = dup.loc[2, "case_num"]
    dup.to_csv(meta_path, index=False)
    with pytest.raises(DataError, match="duplicated case ids.*3"):
        load_dataset("derm7pt", dst)
    meta.to_csv(meta_path, index=False)
    pd.DataFrame({"indexes": [DERM_N + 5]}).to_csv(
        os.path.join(dst, "release_v0", "meta", "valid_indexes.csv"), index=False
    )
    with pytest.raises(DataError, match="outside"):
        load_dataset("derm7pt", dst)


def test_derm7pt_all_missing_dropped_and_file_absent(synthetic_dataset, tmp_path):
    root, manifest = synthetic_dataset("derm7pt", DERM_N)
    dst = _copy(root, tmp_path)
    cl = load_dataset("derm7pt", dst)
    victim = next(c for c in cl.cases if c.missing_reason.get("clinic") == "clinic == derm")
    os.remove(victim.paths["derm"])
    meta_path = os.path.join(dst, "release_v0", "meta", "meta.csv")
    meta = pd.read_csv(meta_path)
    meta.loc[meta["case_num"] == int(victim.case_id), ["elevation", "location", "sex"]] = np.nan
    meta.to_csv(meta_path, index=False)
    after = load_dataset("derm7pt", dst)
    assert len(after.cases) == len(cl.cases) - 1
    assert (victim.case_id, "every modality missing") in after.dropped and len(after.dropped) == 2
    # a deleted derm image of another case is reported as absent
    other = next(c for c in after.cases if c.paths["derm"] and c.paths["clinic"])
    os.remove(other.paths["derm"])
    again = {c.case_id: c for c in load_dataset("derm7pt", dst).cases}
    assert again[other.case_id].missing_reason == {"derm": "file absent"}


# ------------------------------------------------------------------------------------------ ODIR-5K
def test_odir_layout_and_split(synthetic_dataset, tmp_path):
    root, manifest = synthetic_dataset("odir", ODIR_N)
    cl = load_dataset("odir", root)
    _agrees(cl, manifest)
    assert cl.multi_label and cl.class_names == list("NDGCAHMO") and cl.table_columns == ["Patient Age", "Patient Sex"]
    assert all(len(c.label) == 8 and set(c.label) <= {0, 1} for c in cl.cases)
    assert all(os.path.basename(p) == f"{c.case_id}_{eye}.jpg" for c in cl.cases for eye, p in c.paths.items() if p)
    df = pd.read_excel(os.path.join(root, ODIR_ANNOTATION_FILE), sheet_name="Sheet1")
    kws = " ".join(df["Left-Diagnostic Keywords"].astype(str)) + " ".join(df["Right-Diagnostic Keywords"].astype(str))
    assert "\uff0c" in kws
    # the split is saved, then reused even when the seed changes
    split_file = tmp_path / "out" / "odir_split.json"
    first = load_dataset("odir", root, split_file=str(split_file), split_seed=1)
    saved = json.loads(split_file.read_text())["splits"]
    assert {c.case_id: c.split for c in first.cases} == saved
    again = load_dataset("odir", root, split_file=str(split_file), split_seed=7)
    assert {c.case_id: c.split for c in again.cases} == saved
    # Kaggle folder name and image_dir option
    dst = _copy(root, tmp_path)
    os.rename(os.path.join(dst, "ODIR-5K_Training_Dataset"), os.path.join(dst, "Training Images"))
    assert len(load_dataset("odir", dst).cases) == len(cl.cases)
    os.rename(os.path.join(dst, "Training Images"), os.path.join(dst, "imgs"))
    with pytest.raises(DataError, match="Training Images"):
        load_dataset("odir", dst)
    assert len(load_dataset("odir", dst, image_dir="imgs").cases) == len(cl.cases)


def test_odir_bad_inputs(synthetic_dataset, tmp_path):
    root, _ = synthetic_dataset("odir", ODIR_N)
    dst = _copy(root, tmp_path)
    xlsx = os.path.join(dst, ODIR_ANNOTATION_FILE)
    df = pd.read_excel(xlsx, sheet_name="Sheet1")
    bad = df.copy()
    bad.loc[2, "G"] = 2
    bad.to_excel(xlsx, sheet_name="Sheet1", index=False)
    with pytest.raises(DataError, match="case 2.*'G'.*2"):
        load_dataset("odir", dst)
    df.drop(columns=["Patient Sex"]).to_excel(xlsx, sheet_name="Sheet1", index=False)
    with pytest.raises(DataError, match="'Patient Sex'"):
        load_dataset("odir", dst)
    df.to_excel(xlsx, sheet_name="Other", index=False)
    with pytest.raises(DataError, match="Sheet1"):
        load_dataset("odir", dst)
    os.remove(xlsx)
    with pytest.raises(DataError, match="Annotations"):
        load_dataset("odir", dst)


def test_stratified_split_spreads_labels():
    ids = [f"c{i}" for i in range(300)]
    keys = ["a"] * 200 + ["b"] * 60 + ["c"] * 40
    split = stratified_split(ids, keys, (0.7, 0.1, 0.2), seed=0)
    assert split == stratified_split(list(reversed(ids)), list(reversed(keys)), (0.7, 0.1, 0.2), seed=0)
    for key, n in (("a", 200), ("b", 60), ("c", 40)):
        members = [split[i] for i, k in zip(ids, keys) if k == key]
        assert abs(members.count("train") - 0.7 * n) <= 1.5 and abs(members.count("test") - 0.2 * n) <= 1.5
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(ids, keys, (0.5, 0.1, 0.1))


# ------------------------------------------------------------------------------------------ MEN
def test_men_nifti(synthetic_dataset, tmp_path):
    root, manifest = synthetic_dataset("men", MEN_N)
    cl = load_dataset("men", root)
    _agrees(cl, manifest)
    assert cl.modality_names == ["t1c", "t1n", "t2w", "t2f", "table"]
    assert all(m.channels == 1 for m in cl.image_modalities)
    p = cl.cases[0].paths["t1c"]
    assert p.endswith(f"{cl.cases[0].case_id}-t1c.nii.gz")
    sub = load_dataset("men", root, sequences=["t2f", "t1c"], table_columns=[])
    assert sub.modality_names == ["t2f", "t1c"]
    # an explicit split column wins over the made split
    dst = _copy(root, tmp_path)
    table = pd.read_csv(os.path.join(dst, "clinical.csv"))
    table["split"] = ["test"] * len(table)
    table.to_csv(os.path.join(dst, "clinical.csv"), index=False)
    assert {c.split for c in load_dataset("men", dst).cases} == {"test"}
    # column map to other names, grades as words, xlsx table
    renamed = table.drop(columns=["split"]).rename(columns={"case_id": "Subject", "grade": "WHO grade"})
    renamed["WHO grade"] = ["low" if g == 1 else "high" for g in table["grade"]]
    os.remove(os.path.join(dst, "clinical.csv"))
    renamed.to_excel(os.path.join(dst, "clinical.xlsx"), index=False)
    mapped = load_dataset("men", dst, column_map={"case_id": "Subject", "grade": "WHO grade"})
    assert [c.label for c in mapped.cases] == [c.label for c in cl.cases]


def test_men_dicom(synthetic_dataset):
    root, manifest = synthetic_dataset("men", 12, dicom=True)
    cl = load_dataset("men", root)
    _agrees(cl, manifest)
    folder = cl.cases[0].paths["t1c"]
    assert os.path.isdir(folder) and os.path.basename(folder) == "t1c"
    import pydicom

    files = sorted(os.listdir(folder))
    assert len(files) == 24 and all(f.endswith(".dcm") for f in files)
    slices = [pydicom.dcmread(os.path.join(folder, f)) for f in files]
    assert len({s.SeriesInstanceUID for s in slices}) == 1 and slices[0].Modality == "MR"
    assert [s.InstanceNumber for s in slices] == list(range(1, 25))
    assert [float(s.ImagePositionPatient[2]) for s in slices] == [6.0 * k for k in range(24)]
    assert slices[0].pixel_array.shape == (40, 40) and str(slices[0].PatientName).startswith("Synthetic")


def test_men_bad_inputs(synthetic_dataset, tmp_path):
    root, _ = synthetic_dataset("men", MEN_N)
    assert parse_grade(1) == 0 and parse_grade("III") == 1 and parse_grade("Grade 2") == 1
    assert parse_grade("high") == 1 and parse_grade(4) is None
    dst = _copy(root, tmp_path)
    path = os.path.join(dst, "clinical.csv")
    table = pd.read_csv(path)
    bad = table.copy()
    bad.loc[1, "grade"] = 4
    bad.to_csv(path, index=False)
    with pytest.raises(DataError, match=f"{table['case_id'][1]}.*grade 4"):
        load_dataset("men", dst)
    table.drop(columns=["age"]).to_csv(path, index=False)
    with pytest.raises(DataError, match="'age'"):
        load_dataset("men", dst)
    pd.concat([table, table.iloc[:1]]).to_csv(path, index=False)
    with pytest.raises(DataError, match="duplicated"):
        load_dataset("men", dst)
    table.to_csv(os.path.join(dst, "second.csv"), index=False)
    with pytest.raises(DataError, match="exactly one clinical table"):
        load_dataset("men", dst)
    table.assign(case_id=[f"x{i}" for i in range(len(table))]).to_csv(path, index=False)
    with pytest.raises(DataError, match="no folder|has a folder"):
        load_dataset("men", dst, clinical_table="clinical.csv")


def test_men_dicom_reads_with_itk(synthetic_dataset):
    """MONAI's ITKReader and PydicomReader see the synthetic series as one 3D volume with its spacing."""
    root, _ = synthetic_dataset("men", 12, dicom=True)
    cl = load_dataset("men", root)
    from monai.data import ITKReader, PydicomReader

    folder = cl.cases[0].paths["t2w"]
    itk_reader, pyd_reader = ITKReader(), PydicomReader()
    itk_data, itk_meta = itk_reader.get_data(itk_reader.read(folder))
    pyd_data, pyd_meta = pyd_reader.get_data(pyd_reader.read(folder))
    assert itk_data.shape == (40, 40, 24) and pyd_data.shape == (40, 40, 24)
    np.testing.assert_allclose(itk_meta["spacing"], [4.8, 4.8, 6.0])
    np.testing.assert_allclose(pyd_meta["spacing"], [4.8, 4.8, 6.0])
    np.testing.assert_allclose(itk_data, pyd_data)
    assert itk_data.max() > itk_data.min()
