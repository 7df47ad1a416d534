"""scripts/dicom_to_dataset.py: exported DICOM studies + a clinical sheet -> the MEN layout, pseudonymised."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from cmml_monai.data.adapters import load_dataset
from cmml_monai.deploy import inference_cases, inference_dataset, load_description
from cmml_monai.deploy.study import load_study, pseudonym, study_case

from pacs_helpers import MARKER, MARKER_DATE, PHI, PLAIN_PATIENT, ROOT, make_study, trained_men_bundle

KEY = "test-key"


def _script():
    spec = importlib.util.spec_from_file_location(
        "dicom_to_dataset", os.path.join(ROOT, "scripts", "dicom_to_dataset.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("export")
    studies = {
        "p1": make_study(str(root / "pacs" / "a"), ("T1c", "T1", "T2", "FLAIR"), patient=PHI),
        "p2": make_study(
            str(root / "pacs" / "b"), ("T1c", "T2"), patient={**PLAIN_PATIENT, "PatientID": "P2"}, sex="F"
        ),
    }
    # p2's T2 slices differ in orientation: refused, so that sequence is missing too
    bad = studies["p2"]["series"]["T2"][1]
    ds = pydicom.dcmread(bad)
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    ds.save_as(bad)
    sheet = root / "sheet.csv"
    pd.DataFrame(
        [
            {"patient_id": MARKER, "grade": 2, "age": 61},
            {"patient_id": "P2", "grade": 1, "age": 50},
            {"patient_id": "P9", "grade": 1, "age": 40},
        ]
    ).to_csv(sheet, index=False)
    out = root / "men"
    module = _script()
    os.environ[module.KEY_ENV] = KEY
    try:
        status = module.main([str(root / "pacs"), "--clinical", str(sheet), "--out", str(out)])
    finally:
        del os.environ[module.KEY_ENV]
    assert status == 0
    return {"out": str(out), "studies": studies, "module": module, "root": root}


def test_layout_report_and_pseudonyms(converted):
    out = converted["out"]
    c1, c2 = pseudonym(MARKER, KEY), pseudonym("P2", KEY)
    assert sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))) == sorted([c1, c2])
    assert sorted(os.listdir(os.path.join(out, c1))) == [f"{c1}-{s}.nii.gz" for s in ("t1c", "t1n", "t2f", "t2w")]
    clinical = {r["case_id"]: r for r in csv.DictReader(open(os.path.join(out, "clinical.csv")))}
    assert clinical[c1] == {"case_id": c1, "grade": "2", "age": "61", "sex": "M"}  # sex from the header
    assert clinical[c2]["sex"] == "F" and clinical[c2]["grade"] == "1"
    summary = json.load(open(os.path.join(out, "conversion_report.json")))
    report = {r["case_id"]: r for r in summary["cases"]}
    assert report[c1]["missing"] == {} and report[c2]["present"] == ["t1c"] and report[c1]["resampled"] == []
    assert list(report[c2]["missing"]) == ["t1n", "t2w", "t2f"] and report[c2]["missing"]["t1n"] == "no matching series"
    assert report[c2]["missing"]["t2w"].startswith(
        "refused: series 11 'T2 TSE axial' (4 files): its slices differ in orientation"
    )
    assert summary["n_cases"] == 2 and summary["studies_lacking"] == {"t1c": 0, "t1n": 1, "t2w": 1, "t2f": 1}
    assert summary["sheet_rows_without_study"] == 1 and summary["cases_without_clinical_row"] == 0
    # no patient identifier in any file written
    for d, _, files in os.walk(out):
        for f in files:
            data = open(os.path.join(d, f), "rb").read()
            assert MARKER.encode() not in data and MARKER_DATE.encode() not in data, f


def test_men_adapter_reads_it_as_the_study_pipeline_does(converted, tmp_path_factory):
    out = converted["out"]
    cases = load_dataset("men", out, split_file=str(tmp_path_factory.mktemp("split") / "split.json"))
    c1 = pseudonym(MARKER, KEY)
    case = next(c for c in cases.cases if c.case_id == c1)
    assert case.label == 1 and all(case.paths[s] for s in ("t1c", "t1n", "t2w", "t2f"))
    # the NIfTI holds the series' pixels (16 x 16 in plane, 4 slices)
    vol = nib.load(case.paths["t1c"])
    first = pydicom.dcmread(converted["studies"]["p1"]["series"]["T1c"][0]).pixel_array
    assert vol.shape == (16, 16, 4)
    assert np.array_equal(np.sort(vol.get_fdata()[..., 0].ravel()), np.sort(first.astype(float).ravel()))
    # a model trained on such a folder sees what the study pipeline gives for the DICOM study
    desc = load_description(trained_men_bundle(tmp_path_factory))
    table = os.path.join(out, "clinical.csv")
    pd.read_csv(table).assign(sex=lambda d: d["sex"].map({"M": "male", "F": "female"})).to_csv(table, index=False)
    item = next(i for i in inference_dataset(desc, inference_cases(desc, "men", out)) if i["case_id"] == c1)
    batch = study_case(load_study(converted["studies"]["p1"]["folder"]), desc, c1).batch
    assert torch.allclose(item["image"], batch["image"][0], atol=1e-4)


def test_bad_use_is_one_line(converted, tmp_path, capsys):
    module = converted["module"]
    assert module.main([str(converted["root"] / "pacs"), "--out", str(tmp_path / "x")]) == 2
    assert "no pseudonym key" in capsys.readouterr().err
    assert module.main([str(converted["root"] / "pacs"), "--out", converted["out"], "--key", "k"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert module.main([str(tmp_path), "--out", str(tmp_path / "y"), "--key", "k"]) == 2
    assert "no DICOM image file found" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
