"""Study to case (cmml_monai.deploy.study) on real DICOM files rewritten into MR studies (tests/pacs_helpers.py)."""

from __future__ import annotations

import logging
import os
import shutil

import pandas as pd
import pydicom
import pytest
import torch
from pydicom.fileset import FileSet

from cmml_monai.data.errors import DataError
from cmml_monai.deploy import inference_cases, inference_dataset, load_description
from cmml_monai.deploy.study import (
    ClinicalSource,
    SeriesRules,
    header_clinical_values,
    load_study,
    pseudonym,
    scan_studies,
    study_case,
)

from pacs_helpers import DICOMDIR_TESTS, make_study, trained_men_bundle

SEQUENCES = ["t1c", "t1n", "t2w", "t2f"]


@pytest.fixture(scope="module")
def desc(tmp_path_factory) -> dict:
    return load_description(trained_men_bundle(tmp_path_factory))


def _men_layout(study: dict, root: str, age: float | None, sex: str | None) -> str:
    """The same series as the MEN adapter's layout (one DICOM folder per sequence + clinical.csv)."""
    names = {"T1c": "t1c", "T1": "t1n", "T2": "t2w", "FLAIR": "t2f"}
    for name, files in study["series"].items():
        if name in names:
            os.makedirs(os.path.join(root, "c1", names[name]))
            for f in files:
                shutil.copy(f, os.path.join(root, "c1", names[name]))
    pd.DataFrame([{"case_id": "c1", "age": age, "sex": sex}]).to_csv(os.path.join(root, "clinical.csv"), index=False)
    return root


def test_full_study_gives_the_batch_of_the_men_layout(desc, tmp_path):
    study = make_study(str(tmp_path / "study"))
    case = study_case(load_study(study["folder"]), desc, "case-1")
    assert {m: s.description for m, s in case.selection.items()} == {
        "t1c": "T1 MPRAGE post Gd",
        "t1n": "T1 SE axial",
        "t2w": "T2 TSE axial",
        "t2f": "FLAIR axial",
    }
    assert case.clinical == {"age": 45.0, "sex": "male"}  # PatientAge 045Y, PatientSex M in the trained words
    image, tabular = case.batch["image"], case.batch["tabular"]
    assert image.shape == (1, 4, 8, 8, 8) and not image.isnan().any()
    # the same series read through the MEN adapter (the training path) give the same tensors
    men = _men_layout(study, str(tmp_path / "men"), 45, "male")
    item = inference_dataset(desc, inference_cases(desc, "men", men))[0]
    assert torch.allclose(image[0], item["image"]) and torch.equal(tabular[0], item["tabular"])
    assert case.batch["case_id"] == ["case-1"]


def test_missing_sequence_is_nan_and_said_once(desc, tmp_path, caplog):
    study = make_study(str(tmp_path / "study"), ("T1c", "T2"))
    with caplog.at_level(logging.INFO, logger="cmml_monai.deploy.study"):
        case = study_case(load_study(study["folder"]), desc, "case-2")
    assert case.present_images == ["t1c", "t2w"]
    nan = case.batch["image"][0].isnan().flatten(1)
    assert nan.all(1).tolist() == [False, True, False, True] and not nan[[0, 2]].any()
    missing = [r.getMessage() for r in caplog.records if "it is missing" in r.getMessage()]
    assert missing == ["case-2: no series matches t1n; it is missing", "case-2: no series matches t2f; it is missing"]
    # the localizer described as "T1 post contrast" and the derived FLAIR projection were excluded by rule
    assert any(
        "'T1 post contrast' (2 files) excluded for t1c: ImageType LOCALIZER" in r.getMessage() for r in caplog.records
    )


def test_rules_order_and_configuration(tmp_path):
    study = make_study(str(tmp_path / "study"), ("T1c", "T2", "FLAIR"), decoys=False)
    st = load_study(study["folder"])
    # a custom rule: FLAIR named "dark fluid" is not found; the default takes "FLAIR axial"
    assert SeriesRules({"t2f": {"match": ["dark fluid"]}}).select(st, ["t2f"])["t2f"] is None
    assert SeriesRules().select(st, ["t2f"])["t2f"].description == "FLAIR axial"
    # several series match: the first regex decides, then the lowest SeriesNumber
    sel = SeriesRules({"t1c": {"match": ["axial", "post"]}}).select(st, ["t1c", "t2w"])
    assert sel["t1c"].description == "T2 TSE axial" and sel["t2w"] is None  # a series serves one modality
    # excluding localizers can be switched off
    loc = make_study(str(tmp_path / "loc"), ("T2",))
    sel = SeriesRules(excluded_image_types=[], excluded_description=None).select(load_study(loc["folder"]), ["t1c"])
    assert sel["t1c"].description == "T1 post contrast"
    with pytest.raises(ValueError, match=r"regex '\(' does not compile"):
        SeriesRules({"t1c": {"match": ["("]}})
    with pytest.raises(ValueError, match="no series rule for modality 'dwi'"):
        SeriesRules().select(st, ["dwi"])
    assert SeriesRules.from_json({"rules": {"t2f": "FLAIR"}}).rule_for("t2f")["match"][0] == "flair"


def test_dicomdir_and_mixed_studies(desc, tmp_path):
    study = make_study(str(tmp_path / "study"), ("T1c", "T2"))
    fs = FileSet()
    for files in study["series"].values():
        for f in files:
            fs.add(f)
    fs.write(str(tmp_path / "media"))
    via_dir = study_case(load_study(str(tmp_path / "media" / "DICOMDIR")), desc, "c")
    direct = study_case(load_study(study["folder"]), desc, "c")
    assert torch.equal(via_dir.batch["image"].nan_to_num(), direct.batch["image"].nan_to_num())
    # pydicom's DICOMDIR test set: several real studies mixed, the DICOMDIR read
    found = scan_studies(os.path.join(DICOMDIR_TESTS, "DICOMDIR"))
    assert len(found) == len(
        {
            pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID
            for s in found
            for ser in s.series
            for f in ser.files
        }
    )
    assert len(found) > 1
    with pytest.raises(DataError, match=rf"holds {len(found)} studies .* where one was expected"):
        load_study(os.path.join(DICOMDIR_TESTS, "DICOMDIR"))
    # two studies' files in one folder
    make_study(str(tmp_path / "mixed" / "a"), ("T1c",))
    make_study(str(tmp_path / "mixed" / "b"), ("T2",))
    assert sorted(len(s.series) for s in scan_studies(str(tmp_path / "mixed"))) == [3, 3]
    with pytest.raises(DataError, match="holds 2 studies"):
        load_study(str(tmp_path / "mixed"))


def _edit(files, **attrs):
    for f in files:
        ds = pydicom.dcmread(f)
        for k, v in attrs.items():
            if v is None:
                delattr(ds, k)
            else:
                setattr(ds, k, v)
        ds.save_as(f)


def test_bad_input_is_one_line(desc, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("not dicom")
    with pytest.raises(DataError, match="no DICOM image file found"):
        load_study(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="does not exist"):
        load_study(str(tmp_path / "nowhere"))
    cases = {}
    for name, edit in {
        "nopixels": lambda s: _edit(s["T1c"], PixelData=None),
        "orientation": lambda s: _edit(s["T2"][1:2], ImageOrientationPatient=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0]),
        "spacing": lambda s: _edit(s["T2"][2:3], PixelSpacing=[0.5, 0.5]),
        "gap": lambda s: _edit(s["T2"][3:], ImagePositionPatient=[0.0, 0.0, 40.0]),
    }.items():
        study = make_study(str(tmp_path / name), ("T1c", "T2"), decoys=False)
        edit(study["series"])
        with pytest.raises(DataError) as err:
            study_case(load_study(study["folder"]), desc, name)
        cases[name] = str(err.value)
    assert "series 10 'T1 MPRAGE post Gd' (4 files) has a file without pixel data" in cases["nopixels"]
    assert "series 11 'T2 TSE axial' (4 files): its slices differ in orientation" in cases["orientation"]
    assert "differ in pixel spacing or size" in cases["spacing"]
    assert "not evenly spaced" in cases["gap"]
    assert all("\n" not in m for m in cases.values())


def test_clinical_values_from_header_or_table(desc, tmp_path):
    study = make_study(str(tmp_path / "s"), ("T1c",), decoys=False, age="030M", sex="F")
    st = load_study(study["folder"])
    assert header_clinical_values(st.header, ["age", "sex", "weight"], {"sex": ["female", "male"]}) == {
        "age": 2.5,
        "sex": "female",
        "weight": 80.0,
    }
    assert header_clinical_values(st.header, ["sex"], {"sex": ["F", "M"]}) == {"sex": "F"}
    table = tmp_path / "clinical.csv"
    pd.DataFrame([{"case_id": "c7", "age": 61, "sex": "male"}, {"case_id": "c8", "age": 30, "sex": ""}]).to_csv(
        table, index=False
    )
    case = study_case(st, desc, "c7", clinical=ClinicalSource(csv=str(table)))
    schema = desc["data"]["table_schema"]["columns"]
    age = (61 - schema[0]["mean"]) / schema[0]["std"]
    assert case.clinical == {"age": 61, "sex": "male"}
    assert case.batch["tabular"][0].tolist() == pytest.approx([age, 1.0])
    by_attr = ClinicalSource(csv=str(table), key_attribute="AccessionNumber")
    assert study_case(st, desc, "x", clinical=by_attr).batch["tabular"].isnan().all()  # ACC001: no row
    unknown = study_case(st, desc, "c8", clinical=ClinicalSource(csv=str(table)))
    assert unknown.batch["tabular"][0, 1].isnan() and not unknown.batch["tabular"][0, 0].isnan()


def test_pseudonym_is_keyed():
    assert pseudonym("1.2.3", "k1") == pseudonym("1.2.3", "k1") != pseudonym("1.2.3", "k2")
    assert len(pseudonym("1.2.3", b"k")) == 16
    with pytest.raises(ValueError, match="must not be empty"):
        pseudonym("1.2.3", "")


@pytest.mark.parametrize(
    "description, expected",
    [
        ("t1_mprage_sag_p2_iso_post", "t1c"),
        ("Ax T1 +C", "t1c"),
        ("T1 SE TRA KM", "t1c"),
        ("T1c", "t1c"),
        ("AX T1 POST GAD", "t1c"),
        ("T1W_3D_TFE Gd", "t1c"),
        ("T1 SE TRA", "t1n"),
        ("t1_mprage_sag_p2_iso", "t1n"),
        ("T1W_SE", "t1n"),
        ("t1n", "t1n"),
        ("t2_tse_tra", "t2w"),
        ("AX T2 FSE", "t2w"),
        ("T2W_TSE", "t2w"),
        ("t2_tirm_tra_dark-fluid", "t2f"),
        ("AX T2 FLAIR", "t2f"),
        ("FLAIR 3D", "t2f"),
        ("t2f", "t2f"),
        ("t2_fl2d_tra_T2*", None),
        ("SWI_Images", None),
        ("ep2d_diff_b1000", None),
        ("3-plane localizer", None),
    ],
)
def test_default_rules_on_scanner_names(description, expected):
    """Each name alone in a study: which of the MEN modalities (t1c, t1n, t2w, t2f) takes it, if any."""
    from cmml_monai.deploy.study import SeriesInfo, Study

    study = Study("1.2.3", [SeriesInfo("1.2.3.4", 5, description, "", "MR", ("ORIGINAL", "PRIMARY"))], None)
    chosen = [m for m, s in SeriesRules().select(study, SEQUENCES).items() if s is not None]
    assert chosen == ([] if expected is None else [expected])


def test_uneven_slices_refused_or_resampled(desc, tmp_path, monkeypatch, caplog):
    import nibabel as nib
    import numpy as np

    from cmml_monai.deploy import study as study_module
    from cmml_monai.deploy.study import resample_series

    # resampling an evenly spaced series changes nothing: it gives the batch of the training readers
    even = load_study(make_study(str(tmp_path / "even"), ("T1c", "T2"), decoys=False)["folder"])
    expected = study_case(even, desc, "e").batch["image"]
    monkeypatch.setattr(study_module, "check_series", lambda series, allow_uneven=False: True)
    resampled = study_case(even, desc, "e", irregular="resample").batch["image"]
    monkeypatch.undo()
    assert torch.allclose(resampled.nan_to_num(), expected.nan_to_num(), atol=1e-4)
    # the last T2 slice at 8 mm instead of 6 mm: gaps 2, 2, 4
    study = make_study(str(tmp_path / "uneven"), ("T1c", "T2"), decoys=False)
    _edit(study["series"]["T2"][3:], ImagePositionPatient=[0.0, 0.0, 8.0])
    st = load_study(study["folder"])
    with pytest.raises(DataError, match=r"not evenly spaced \(gaps 2 to 4 mm\).* or resample it \(--irregular"):
        study_case(st, desc, "u")
    with caplog.at_level(logging.WARNING, logger="cmml_monai.deploy.study"):
        case = study_case(st, desc, "u", irregular="resample")
    assert not case.batch["image"][0, 2].isnan().any()
    assert any(
        "u: series 11 'T2 TSE axial' (4 files) has unevenly spaced slices; resampled to an even 2 mm gap for "
        "t2w" in r.getMessage()
        for r in caplog.records
    )
    t2 = next(s for s in st.series if s.description == "T2 TSE axial")
    assert resample_series(t2, str(tmp_path / "t2.nii.gz")) == 2.0
    vol = nib.load(str(tmp_path / "t2.nii.gz"))
    planes = [pydicom.dcmread(f).pixel_array.T.astype(np.float32) for f in study["series"]["T2"]]
    data = vol.get_fdata()
    assert data.shape == (16, 16, 5) and np.allclose(vol.affine[:3, 3], [0.0, 0.0, 0.0])
    assert np.allclose(data[..., 2], planes[2]) and np.allclose(data[..., 4], planes[3])
    assert np.allclose(data[..., 3], (planes[2] + planes[3]) / 2)  # 6 mm: halfway between 4 and 8 mm
    with pytest.raises(ValueError, match="irregular must be one of"):
        study_case(st, desc, "u", irregular="fix")
