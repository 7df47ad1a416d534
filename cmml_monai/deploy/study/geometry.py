"""Geometry: a selected series checked as one regular volume (pixel data, orientation, spacing, slice
gaps), and an unevenly spaced one resampled onto an even grid."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cmml_monai.data.errors import DataError
from cmml_monai.data.readers import SPACING_TOLERANCE
from cmml_monai.deploy.study.scan import SeriesInfo, _int_or_none

__all__ = ["MAX_VOXELS", "check_series", "resample_series"]

_ORIENTATION_TOLERANCE = 1e-3


def _floats(value: Any) -> tuple[float, ...] | None:
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


#: the largest image a series file may declare (voxels): a header beyond it is refused before any read
MAX_VOXELS = 2**31


def _check_pixel_length(ds: Any, path: str, series: SeriesInfo) -> None:
    """Refuse a file whose native pixel data is shorter than Rows x Columns x samples x frames x bytes (a
    truncated file, or a header claiming more than it holds): decoding it would read memory that is not there."""
    if "PixelData" not in ds:
        return
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and getattr(ts, "is_encapsulated", False):
        return  # compressed: the decoder checks its own frames
    rows, cols = _int_or_none(ds.get("Rows")) or 0, _int_or_none(ds.get("Columns")) or 0
    samples = _int_or_none(ds.get("SamplesPerPixel")) or 1
    frames = max(1, _int_or_none(ds.get("NumberOfFrames")) or 1)
    bits = _int_or_none(ds.get("BitsAllocated")) or 0
    voxels = rows * cols * samples * frames
    expected = (voxels * bits + 7) // 8
    raw = ds.get_item("PixelData")  # the raw element: its declared length, not its (deferred) value
    length = raw.length if raw.value is None else len(raw.value)
    tell = getattr(raw, "value_tell", None)
    if raw.value is None and tell is not None:
        length = min(length, max(0, os.path.getsize(path) - tell))  # a file cut short
    if voxels > MAX_VOXELS or bits == 0 or length < expected:
        raise DataError(
            f"{series.label()}: a file's pixel data holds {length} bytes where its header "
            f"(Rows {rows} x Columns {cols} x {frames} frame(s) x {samples} sample(s) x {bits} bits) "
            f"needs {expected}; the file is truncated or its header is wrong: export the series again"
        )


def _slice_geometry(series: SeriesInfo) -> tuple[set, set, set, list[float], int]:
    """Per series, from each file's header: the orientations, pixel spacings, sizes, slice positions along
    the normal and the frame count; refuses a file without (enough) pixel data."""
    import pydicom

    orientations, spacings, shapes, positions, frames = set(), set(), set(), [], 0
    for f in series.files:
        # defer_size: big values (the pixels) are not read, but their presence is known
        ds = pydicom.dcmread(f, defer_size=1024)
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise DataError(f"{series.label()} has a file without pixel data; export the series again with its images")
        _check_pixel_length(ds, f, series)
        frames += max(1, _int_or_none(ds.get("NumberOfFrames")) or 1)
        iop, ipp = _floats(ds.get("ImageOrientationPatient")), _floats(ds.get("ImagePositionPatient"))
        if iop is not None and len(iop) == 6:
            orientations.add(tuple(round(v / _ORIENTATION_TOLERANCE) for v in iop))
        spacing = _floats(ds.get("PixelSpacing"))
        if spacing is not None:
            spacings.add(tuple(round(v, 4) for v in spacing))
        shapes.add((ds.get("Rows"), ds.get("Columns")))
        if iop is not None and len(iop) == 6 and ipp is not None and len(ipp) == 3:
            normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
            positions.append(float(np.asarray(ipp) @ normal))
    return orientations, spacings, shapes, positions, frames


def check_series(series: SeriesInfo, allow_uneven: bool = False) -> bool:
    """Refuse a series the network cannot take as one volume.

    Args:
        series: the series.
        allow_uneven: accept slices that are not evenly spaced (for :func:`resample_series`).

    Returns:
        True when the slices are not evenly spaced (only with ``allow_uneven``): the caller resamples them.

    Raises:
        DataError: a file without pixel data or with less pixel data than its header declares, slices of
            different orientation, pixel spacing or size, slices sharing a position, or (unless
            ``allow_uneven``) not evenly spaced (a missing slice, mixed acquisitions).

    Example:
        >>> check_series(load_study("/exports/study_0001").series[1])  # doctest: +SKIP
        False
    """
    orientations, spacings, shapes, positions, frames = _slice_geometry(series)
    if len(orientations) > 1:
        raise DataError(
            f"{series.label()}: its slices differ in orientation ({len(orientations)} orientations); "
            "a series must be one stack of parallel slices"
        )
    if len(spacings) > 1 or len(shapes) > 1:
        raise DataError(
            f"{series.label()}: its slices differ in pixel spacing or size ({sorted(spacings)}, "
            f"{sorted(shapes, key=str)}); a series must be one regular volume"
        )
    if frames != len(series.files) or len(positions) < 3 or len(positions) != len(series.files):
        return False  # multi-frame or no geometry: the reader checks what it can
    gaps = np.diff(np.sort(np.asarray(positions)))
    median = float(np.median(gaps))
    if median > 0 and float(np.max(np.abs(gaps - median))) <= SPACING_TOLERANCE * median:
        return False
    if allow_uneven and float(gaps.min()) > 0:
        return True
    raise DataError(
        f"{series.label()}: its slices are not evenly spaced (gaps {gaps.min():.3g} to "
        f"{gaps.max():.3g} mm): a slice is missing or it mixes acquisitions; export it again"
        + ("" if allow_uneven else " or resample it (--irregular resample)")
    )


def resample_series(series: SeriesInfo, dest: str) -> float:
    """Stack an unevenly spaced series onto an even grid and save it as NIfTI (RAS affine, geometry only).

    The grid runs from the first to the last slice at the median gap; each plane is interpolated linearly
    between the two acquired slices around it (the rescale slope and intercept applied). Only for series
    that :func:`check_series` passed with ``allow_uneven`` (one orientation, spacing and size).

    Returns:
        the even gap in mm.

    Example:
        >>> resample_series(series, "work/t2w.nii.gz")  # doctest: +SKIP
        2.0
    """
    import nibabel as nib
    import pydicom

    slices: list[tuple[float, Any, Any, Any, Any]] = []  # position, origin, plane, orientation, spacing
    for f in series.files:
        ds = pydicom.dcmread(f)
        iop = np.asarray(_floats(ds.ImageOrientationPatient), dtype=np.float64)
        ipp = np.asarray(_floats(ds.ImagePositionPatient), dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        plane = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(
            ds.get("RescaleIntercept", 0) or 0
        )
        slices.append((float(ipp @ normal), ipp, plane, iop, _floats(ds.PixelSpacing)))
    slices.sort(key=lambda t: t[0])
    pos = np.asarray([t[0] for t in slices])
    gap = float(np.median(np.diff(pos)))
    grid = pos[0] + gap * np.arange(int(round((pos[-1] - pos[0]) / gap)) + 1)
    # a DICOM plane is rows x columns = y x x; the volume is (x, y, z) like the readers' output
    stack = np.stack([t[2].T for t in slices], axis=-1)
    upper = np.clip(np.searchsorted(pos, grid, side="right"), 1, len(pos) - 1)
    w = ((grid - pos[upper - 1]) / (pos[upper] - pos[upper - 1])).clip(0, 1).astype(np.float32)
    volume = stack[..., upper - 1] * (1 - w) + stack[..., upper] * w
    _, origin, _, iop, (row_spacing, col_spacing) = slices[0]
    normal = np.cross(iop[:3], iop[3:])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = iop[:3] * col_spacing, iop[3:] * row_spacing, normal * gap, origin
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps), dest)
    return gap
