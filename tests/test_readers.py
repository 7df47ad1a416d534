"""Readers on real files shipped with pydicom, nibabel and nilearn, plus images written with PIL."""

from __future__ import annotations

import glob
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cmml_monai.data.errors import DataError
from cmml_monai.data.readers import SAFE_META_KEYS, LoadModalityd, list_dicom_series, load_image, strip_phi

PYDICOM_DATA = os.path.dirname(pydicom.data.get_testdata_file("MR_small.dcm"))
CT5N = os.path.join(PYDICOM_DATA, "dicomdirtests", "98892001", "CT5N")
CT2N = os.path.join(PYDICOM_DATA, "dicomdirtests", "98892001", "CT2N")
NIB_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


def _slices(folder: str) -> list[pydicom.Dataset]:
    return sorted(
        (pydicom.dcmread(f) for f in glob.glob(os.path.join(folder, "*"))),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )


def _modality_values(ds: pydicom.Dataset) -> np.ndarray:
    """Pixel values after the DICOM rescale, as the readers return them."""
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    inter = float(getattr(ds, "RescaleIntercept", 0.0))
    return ds.pixel_array.astype(np.float64) * slope + inter


# ------------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reader", ["itk", "pydicom"])
def test_dicom_series_shape_spacing_values_match_pydicom(reader):
    slices = _slices(CT5N)
    img = load_image(CT5N, "image3d", reader=reader)
    rows, cols = int(slices[0].Rows), int(slices[0].Columns)
    assert tuple(img.shape) == (1, cols, rows, len(slices))
    dz = abs(float(slices[1].ImagePositionPatient[2]) - float(slices[0].ImagePositionPatient[2]))
    row_sp, col_sp = (float(v) for v in slices[0].PixelSpacing)
    np.testing.assert_allclose(img.pixdim.numpy(), [col_sp, row_sp, dz], rtol=1e-5)
    # same voxel values as pydicom (order along z may differ between readers: compare per slice sets)
    vol = np.stack([_modality_values(s) for s in slices], axis=-1).transpose(1, 0, 2)  # (x, y, z)
    got = img[0].numpy()
    assert sorted(got.sum(axis=(0, 1)).round(3).tolist()) == sorted(vol.sum(axis=(0, 1)).round(3).tolist())
    assert img.dtype == torch.float32


def test_dicom_readers_agree_in_ras():
    from monai.transforms import Orientation

    a = Orientation("RAS", labels=None)(load_image(CT5N, "image3d", reader="itk"))
    b = Orientation("RAS", labels=None)(load_image(CT5N, "image3d", reader="pydicom"))
    np.testing.assert_allclose(a.numpy(), b.numpy())
    np.testing.assert_allclose(a.affine.numpy(), b.affine.numpy(), atol=1e-3)


@pytest.mark.parametrize("reader", ["itk", "pydicom"])
def test_single_dicom_file_is_volume_of_depth_one(reader):
    path = pydicom.data.get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    img = load_image(path, "image3d", reader=reader)
    assert tuple(img.shape) == (1, int(ds.Columns), int(ds.Rows), 1)
    np.testing.assert_allclose(img.pixdim.numpy()[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])
    np.testing.assert_allclose(img[0, :, :, 0].numpy(), _modality_values(ds).T)


def _write_enhanced_mr(path: str, vol: np.ndarray, spacing=(0.5, 0.75), dz=2.5) -> None:
    """A minimal Enhanced MR Image Storage file: vol is (frames, rows, cols) uint16."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientName = "Secret^Person"
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = vol.shape[1:]
    ds.NumberOfFrames = vol.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    shared, measures, orient = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = list(spacing), dz
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orient])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i in range(vol.shape[0]):
        frame, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [-10.0, -20.0, 5.0 + dz * i]
        frame.PlanePositionSequence = Sequence([pos])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = vol.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("reader", ["itk", "pydicom"])
def test_enhanced_multiframe_dicom_is_3d(tmp_path, reader):
    # pydicom ships no enhanced MR (emri_small.dcm is a download), so write one; non-square frames
    # catch swapped axes
    vol = np.random.default_rng(0).integers(0, 4000, size=(6, 12, 20)).astype(np.uint16)
    path = str(tmp_path / "emr.dcm")
    _write_enhanced_mr(path, vol)
    img = load_image(path, "image3d", reader=reader)
    assert tuple(img.shape) == (1, 20, 12, 6)
    np.testing.assert_allclose(img.pixdim.numpy(), [0.75, 0.5, 2.5])
    np.testing.assert_array_equal(img[0].numpy(), vol.transpose(2, 1, 0).astype(np.float32))
    assert set(img.meta) <= SAFE_META_KEYS  # the patient name never reaches the metadata


@pytest.mark.parametrize("reader", ["itk", "pydicom"])
def test_rtdose_multiframe_shipped_file(reader):
    path = pydicom.data.get_testdata_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    img = load_image(path, "image3d", reader=reader)
    assert tuple(img.shape) == (1, int(ds.Columns), int(ds.Rows), int(ds.NumberOfFrames))
    dz = abs(float(ds.GridFrameOffsetVector[1]) - float(ds.GridFrameOffsetVector[0]))
    np.testing.assert_allclose(img.pixdim.numpy(), [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), dz])


@pytest.mark.parametrize("reader", ["itk", "pydicom"])
def test_truncated_dicom_raises_data_error_naming_file(reader):
    path = pydicom.data.get_testdata_file("MR_truncated.dcm")
    with pytest.raises(DataError, match="MR_truncated.dcm"):
        load_image(path, "image3d", reader=reader)


@pytest.fixture
def two_series(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    for src in (CT5N, CT2N):
        for f in glob.glob(os.path.join(src, "*")):
            shutil.copy(f, folder / f"{os.path.basename(src)}_{os.path.basename(f)}")
    return str(folder)


def test_several_series_refused_with_listing_and_no_phi(two_series):
    ct5 = pydicom.dcmread(glob.glob(os.path.join(CT5N, "*"))[0])
    ct2 = pydicom.dcmread(glob.glob(os.path.join(CT2N, "*"))[0])
    with pytest.raises(DataError) as info:
        load_image(two_series, "image3d")
    msg = str(info.value)
    assert "2 DICOM series" in msg and two_series in msg
    assert ct5.SeriesInstanceUID[-12:] in msg and ct2.SeriesInstanceUID[-12:] in msg
    assert "5 files" in msg and "2 files" in msg and "CT" in msg
    assert str(ct5.SeriesDescription) in msg
    for phi in (str(ct5.PatientName), str(ct5.PatientID)):
        assert phi and phi not in msg
    assert "\n" not in msg


@pytest.mark.parametrize("reader", ["itk", "pydicom"])
def test_several_series_pick_by_uid_or_description(two_series, reader):
    ct5 = pydicom.dcmread(glob.glob(os.path.join(CT5N, "*"))[0])
    ref = load_image(CT5N, "image3d", reader=reader)
    by_uid = load_image(two_series, "image3d", reader=reader, series=ct5.SeriesInstanceUID)
    by_suffix = load_image(two_series, "image3d", reader=reader, series=ct5.SeriesInstanceUID[-10:])
    by_desc = load_image(two_series, "image3d", reader=reader, series=str(ct5.SeriesDescription).upper())
    for img in (by_uid, by_suffix, by_desc):
        assert tuple(img.shape) == (1, 16, 16, 5)
        np.testing.assert_allclose(img.numpy(), ref.numpy())
    with pytest.raises(DataError, match="matches none"):
        load_image(two_series, "image3d", reader=reader, series="no-such-series")


def test_list_dicom_series_counts(two_series):
    found = list_dicom_series(two_series)
    assert [len(s.files) for s in found] == [5, 2]
    assert [s.modality for s in found] == ["CT", "CT"]


@pytest.mark.parametrize("reader", ["itk", "pydicom"])
def test_dicom_metadata_has_no_phi_tags(reader):
    img = load_image(CT5N, "image3d", reader=reader)
    assert set(img.meta) <= SAFE_META_KEYS
    assert "affine" in img.meta and "filename_or_obj" in img.meta
    assert strip_phi({"0010|0010": "Name", "affine": 1}) == {"affine": 1}


# ------------------------------------------------------------------------------------------------
# NIfTI
# ------------------------------------------------------------------------------------------------
def test_nifti_3d_matches_nibabel():
    path = os.path.join(NIB_DATA, "anatomical.nii")
    ref = nib.load(path)
    img = load_image(path, "image3d")
    assert tuple(img.shape) == (1, *ref.shape)
    np.testing.assert_allclose(img.pixdim.numpy(), ref.header.get_zooms()[:3], rtol=1e-6)
    np.testing.assert_allclose(img[0].numpy(), ref.get_fdata(), rtol=1e-6)


def test_nifti_4d_refused_with_shape():
    path = os.path.join(NIB_DATA, "example4d.nii.gz")
    shape = nib.load(path).shape
    with pytest.raises(DataError) as info:
        load_image(path, "image3d")
    assert "example4d.nii.gz" in str(info.value) and str(tuple(shape)) in str(info.value)


def test_nifti_trailing_singleton_squeezed(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6, 1)
    path = str(tmp_path / "one.nii.gz")
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 2.0, 3.0, 1.0])), path)
    img = load_image(path, "image3d")
    assert tuple(img.shape) == (1, 4, 5, 6)
    np.testing.assert_allclose(img.pixdim.numpy(), [1.5, 2.0, 3.0])
    np.testing.assert_array_equal(img[0].numpy(), data[..., 0])


def test_nilearn_mni152_template():
    from nilearn.datasets import MNI152_FILE_PATH, load_mni152_template

    ref = load_mni152_template(resolution=1)  # reads the file shipped inside nilearn, no download
    img = load_image(MNI152_FILE_PATH, "image3d")
    assert tuple(img.shape) == (1, *ref.shape)
    np.testing.assert_allclose(img.pixdim.numpy(), ref.header.get_zooms()[:3], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# 2D images
# ------------------------------------------------------------------------------------------------
def test_jpeg_rgb_channel_first(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(30, 50, 3)).astype(np.uint8)
    path = str(tmp_path / "photo.JPG")
    Image.fromarray(rgb).save(path, format="JPEG", quality=95)
    decoded = np.asarray(Image.open(path).convert("RGB"))
    img = load_image(path, "image2d")
    assert tuple(img.shape) == (3, 30, 50)
    np.testing.assert_array_equal(img.numpy(), decoded.transpose(2, 0, 1).astype(np.float32))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    rgb = np.random.default_rng(2).integers(0, 256, size=(20, 24, 3)).astype(np.uint8)
    pil = Image.fromarray(rgb).convert(mode)
    path = str(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"))
    pil.save(path)
    expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    img = load_image(path, "image2d")
    assert tuple(img.shape) == (3, 20, 24)
    np.testing.assert_array_equal(img.numpy(), expected.astype(np.float32))
    if mode == "L":
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


def test_exif_orientation_applied(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, size=(10, 30, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = str(tmp_path / "phone.png")
    Image.fromarray(rgb).save(path, exif=exif)
    img = load_image(path, "image2d")
    assert tuple(img.shape) == (3, 30, 10)
    np.testing.assert_array_equal(img.numpy(), np.rot90(rgb, k=-1).transpose(2, 0, 1).astype(np.float32))


def test_truncated_jpeg_raises_data_error(tmp_path):
    good = str(tmp_path / "good.jpg")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(good)
    raw = open(good, "rb").read()
    bad = str(tmp_path / "broken.jpg")
    with open(bad, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="broken.jpg"):
        load_image(bad, "image2d")


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="nothere.jpg"):
        load_image(str(tmp_path / "nothere.jpg"), "image2d")
    with pytest.raises(ValueError, match="image4d"):
        load_image(str(tmp_path), "image4d")
    with pytest.raises(ValueError, match="simpleitk"):
        load_image(str(tmp_path), "image3d", reader="simpleitk")


# ------------------------------------------------------------------------------------------------
# LoadModalityd
# ------------------------------------------------------------------------------------------------
def test_load_modalityd_keeps_missing_none_and_names_case(tmp_path):
    good = str(tmp_path / "d.png")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(good)
    load = LoadModalityd(["clinic", "derm"], "image2d")
    out = load({"case_id": "c7", "clinic": None, "derm": good})
    assert out["clinic"] is None and tuple(out["derm"].shape) == (3, 8, 10)
    with pytest.raises(DataError) as info:
        load({"case_id": "c8", "clinic": str(tmp_path / "gone.jpg"), "derm": None})
    assert "c8" in str(info.value) and "gone.jpg" in str(info.value) and "clinic" in str(info.value)
    with pytest.raises(ValueError, match="kinds"):
        LoadModalityd(["a", "b"], ["image2d"])


def test_load_modalityd_series_per_key(two_series):
    ct5 = pydicom.dcmread(glob.glob(os.path.join(CT5N, "*"))[0])
    load = LoadModalityd(["ct", "mr"], "image3d", reader="pydicom", series={"ct": str(ct5.SeriesDescription)})
    out = load({"case_id": "s1", "ct": two_series, "mr": None})
    assert tuple(out["ct"].shape) == (1, 16, 16, 5) and out["mr"] is None
    with pytest.raises(DataError, match="case s2, modality ct: .*2 DICOM series"):
        LoadModalityd(["ct"], "image3d")({"case_id": "s2", "ct": two_series})


def test_pydicom_series_with_unstackable_slice_refused(tmp_path):
    folder = tmp_path / "series"
    shutil.copytree(CT5N, folder)
    victim = sorted(glob.glob(str(folder / "*")))[2]
    ds = pydicom.dcmread(victim)
    del ds.InstanceNumber
    ds.save_as(victim)
    with pytest.raises(DataError, match="only 4 of the 5 files"):
        load_image(str(folder), "image3d", reader="pydicom")
    assert tuple(load_image(str(folder), "image3d", reader="itk").shape) == (1, 16, 16, 5)


@pytest.mark.parametrize(
    "name, kind, reader",
    [
        ("noise.dcm", "image3d", "itk"),
        ("noise.dcm", "image3d", "pydicom"),
        ("noise.nii.gz", "image3d", "itk"),
        ("noise.png", "image2d", "itk"),
    ],
)
def test_garbage_files_raise_data_error(tmp_path, name, kind, reader):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(5).integers(0, 256, 4096).astype(np.uint8).tobytes())
    with pytest.raises(DataError, match=name):
        load_image(str(path), kind, reader=reader)


def test_relative_series_path_and_mha(tmp_path, monkeypatch, two_series):
    ct5 = pydicom.dcmread(glob.glob(os.path.join(CT5N, "*"))[0])
    monkeypatch.chdir(os.path.dirname(two_series))
    rel = os.path.join(".", os.path.basename(two_series))
    img = load_image(rel, "image3d", reader="pydicom", series=ct5.SeriesInstanceUID)
    assert tuple(img.shape) == (1, 16, 16, 5)
    import itk

    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(6, 5, 4)  # ITK arrays are (z, y, x)
    image = itk.image_from_array(vol)
    image.SetSpacing([1.0, 2.0, 3.0])
    itk.imwrite(image, str(tmp_path / "v.mha"))
    got = load_image(str(tmp_path / "v.mha"), "image3d", reader="pydicom")
    assert tuple(got.shape) == (1, 4, 5, 6)
    np.testing.assert_allclose(got.pixdim.numpy(), [1.0, 2.0, 3.0])
