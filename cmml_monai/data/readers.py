"""Image readers: one entry point per modality kind on top of MONAI's ``LoadImage``.

* 2D photos / fundus images (JPEG, PNG, BMP, TIFF) are read with ``PILReader`` and converted to RGB
  whatever the file's mode (grayscale, RGBA, palette, CMYK), channel-first ``[3, H, W]``.
* 3D volumes: NIfTI (``.nii``, ``.nii.gz``) with ``NibabelReader``; a DICOM series folder with
  ``ITKReader`` (default) or ``PydicomReader``; a single DICOM file (including an enhanced
  multi-frame one) as a 3D volume. Output ``[1, X, Y, Z]`` with its affine.

Every library failure (truncated file, unknown format, 4D volume where 3D is expected, a folder with
several DICOM series and no selection) becomes a one-line :class:`~cmml_monai.data.errors.DataError`
naming the file. Metadata is reduced to geometry and the file name, so nothing that could carry a
patient identifier (DICOM PHI tags, NIfTI ``descrip``) is kept, cached or logged.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.image_reader import ImageReader, ITKReader, NibabelReader, PILReader, PydicomReader
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform

from cmml_monai.data.errors import DataError
from cmml_monai.data.formats import IMAGE_2D_SUFFIXES, ITK_ONLY_SUFFIXES, NIFTI_SUFFIXES, path_suffix

__all__ = [
    "IMAGE_2D_SUFFIXES",
    "NIFTI_SUFFIXES",
    "ITK_ONLY_SUFFIXES",
    "path_suffix",
    "SAFE_META_KEYS",
    "DicomSeriesInfo",
    "list_dicom_series",
    "check_slice_spacing",
    "select_dicom_series",
    "strip_phi",
    "load_image",
    "LoadModalityd",
]

READERS_3D = ("itk", "pydicom")
MAX_DECODE_SIDE = 2048  # larger JPEGs are decoded at a reduced scale whose long side is at least this
SPACING_TOLERANCE = 0.01  # relative deviation of a DICOM slice gap from the median gap that is refused

# Geometry and provenance only: everything else (DICOM tags, NIfTI header text) may hold PHI.
SAFE_META_KEYS = frozenset(
    {
        "affine",
        "original_affine",
        "spatial_shape",
        "space",
        "original_channel_dim",
        "filename_or_obj",
        "spacing",
    }
)


def strip_phi(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only geometry / file-name entries of an image metadata dict.

    Args:
        meta: metadata as returned by a MONAI reader (may hold raw DICOM tags such as ``0010|0010``).

    Returns:
        a new dict with only the keys in :data:`SAFE_META_KEYS`.
    """
    return {k: v for k, v in meta.items() if k in SAFE_META_KEYS}


def _rgb(image: Any) -> Any:
    """PIL converter: upright (EXIF orientation applied) 3-channel RGB from any mode (L, LA, P, RGBA, CMYK ...).

    A JPEG longer than ``2 * MAX_DECODE_SIDE`` is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
    long side still >= ``MAX_DECODE_SIDE``): a 6000x4000 photo would otherwise take ~450 MB per loading
    thread as float32 before being resized to a few hundred pixels.
    """
    from PIL import ImageOps

    if getattr(image, "format", None) == "JPEG" and max(image.size) > 2 * MAX_DECODE_SIDE:
        k = MAX_DECODE_SIDE / max(image.size)
        image.draft(None, (int(np.ceil(image.size[0] * k)), int(np.ceil(image.size[1] * k))))
    image = ImageOps.exif_transpose(image)  # phone photos are often stored rotated with an EXIF flag
    return image if image.mode == "RGB" else image.convert("RGB")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    msg = text[0] if text else type(err).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


# ------------------------------------------------------------------------------------------------
# DICOM series discovery
# ------------------------------------------------------------------------------------------------
@dataclass
class DicomSeriesInfo:
    """One DICOM series found in a folder (no patient identifiers).

    Args:
        uid: SeriesInstanceUID.
        description: SeriesDescription ("" when absent).
        modality: Modality tag ("" when absent).
        files: the files of the series (sorted paths).
        frames: total number of frames (``NumberOfFrames`` summed, 1 per single-frame file).
        positions: per file, its position along the slice normal in mm (None without geometry tags).
    """

    uid: str
    description: str = ""
    modality: str = ""
    files: list[str] = field(default_factory=list)
    frames: int = 0
    positions: list[float | None] = field(default_factory=list)

    def summary(self) -> str:
        """``...<uid suffix> 'description' MR, 12 files`` for error messages."""
        return f"...{self.uid[-12:]} {self.description!r} {self.modality or '?'}, {len(self.files)} files"


def list_dicom_series(folder: str) -> list[DicomSeriesInfo]:
    """Group the DICOM files of ``folder`` (not recursive) by SeriesInstanceUID.

    Non-DICOM files and DICOM files without pixel data (DICOMDIR, SR, ...) are skipped.

    Args:
        folder: a folder of DICOM files.

    Returns:
        the series, largest first.

    Raises:
        DataError: the folder holds no DICOM image file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    tags = [
        "SeriesInstanceUID",
        "SeriesDescription",
        "Modality",
        "NumberOfFrames",
        "Rows",
        "ImagePositionPatient",
        "ImageOrientationPatient",
    ]
    series: dict[str, DicomSeriesInfo] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError):
            continue  # not DICOM (readme, thumbnails ...): ignore like scanners' exports expect
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid or ds.get("Rows") is None:
            continue
        info = series.setdefault(
            uid, DicomSeriesInfo(uid, str(ds.get("SeriesDescription", "") or ""), str(ds.get("Modality", "") or ""))
        )
        info.files.append(path)
        info.positions.append(_slice_position(ds))
        try:
            info.frames += max(1, int(ds.get("NumberOfFrames", 1) or 1))
        except (TypeError, ValueError):
            info.frames += 1
    if not series:
        raise DataError(f"{folder}: no DICOM image files found; point the path at a DICOM series folder")
    return sorted(series.values(), key=lambda s: (-len(s.files), s.uid))


def _slice_position(ds: Any) -> float | None:
    """Position of a slice along its normal (ImagePositionPatient . normal of ImageOrientationPatient)."""
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    except (AttributeError, TypeError, ValueError):
        return None
    if ipp.shape != (3,) or iop.shape != (6,):
        return None
    return float(ipp @ np.cross(iop[:3], iop[3:]))


def check_slice_spacing(folder: str, info: DicomSeriesInfo) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced (a missing slice, mixed acquisitions).

    Both readers would silently give the volume one mean spacing, so every later resampling (``pixdim``)
    would put anatomy at the wrong place. Series without geometry tags or of fewer than 3 slices pass.

    Raises:
        DataError: the gaps between consecutive slice positions differ by more than ``SPACING_TOLERANCE``
            (relative to the median gap), or two slices share a position.
    """
    if len(info.positions) < 3 or any(p is None for p in info.positions) or info.frames != len(info.files):
        return
    gaps = np.diff(np.sort(np.asarray(info.positions, dtype=np.float64)))
    median = float(np.median(gaps))
    if median > 0 and float(np.max(np.abs(gaps - median))) <= SPACING_TOLERANCE * median:
        return
    raise DataError(
        f"{folder}: the {len(info.files)} slices of the DICOM series are not evenly spaced (gaps "
        f"{gaps.min():.3g} to {gaps.max():.3g} mm): a slice is missing or the folder mixes acquisitions; "
        "export the complete series again or mark the modality missing"
    )


def select_dicom_series(folder: str, series: str | None = None) -> DicomSeriesInfo:
    """Pick one series of a DICOM folder.

    Args:
        folder: a folder of DICOM files.
        series: SeriesInstanceUID (full or a unique suffix) or SeriesDescription (case-insensitive) to
            take; ``None`` accepts a folder holding exactly one series.

    Raises:
        DataError: no match, an ambiguous match, or several series and no ``series`` given; the
            message lists the series (UID suffix, description, modality, number of files).
    """
    found = list_dicom_series(folder)
    listing = "; ".join(s.summary() for s in found)
    if series is None or str(series).strip() == "":
        if len(found) == 1:
            return found[0]
        raise DataError(
            f"{folder}: holds {len(found)} DICOM series ({listing}); "
            "set the series to use (series UID or description) in the dataset config"
        )
    want = str(series).strip()
    matches = [s for s in found if s.uid == want]
    if not matches:
        matches = [s for s in found if s.uid.endswith(want)]
    if not matches:
        matches = [s for s in found if s.description.strip().lower() == want.lower()]
    if len(matches) == 1:
        return matches[0]
    what = "matches several" if matches else "matches none"
    raise DataError(
        f"{folder}: configured series {want!r} {what} of its DICOM series ({listing}); fix the series setting"
    )


def _itk_series_name(folder: str, files: Sequence[str]) -> str:
    """The GDCM series identifier (UID plus details) whose files are exactly ``files``."""
    import itk

    gen = itk.GDCMSeriesFileNames.New()
    gen.SetUseSeriesDetails(True)  # the same settings as monai's ITKReader
    gen.AddSeriesRestriction("0008|0021")
    gen.SetDirectory(folder)
    wanted = {os.path.realpath(f) for f in files}
    best, best_n = "", 0
    for ident in gen.GetSeriesUIDs():
        names = {os.path.realpath(f) for f in gen.GetFileNames(ident)}
        if names <= wanted and len(names) > best_n:
            best, best_n = ident, len(names)
    if best_n != len(wanted):
        raise DataError(
            f"{folder}: ITK splits the selected DICOM series into parts with different geometry "
            f"({best_n} of {len(wanted)} files in the largest); try reader='pydicom' or clean the series"
        )
    return best


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------
_LOADER = LoadImage(image_only=True)  # readers are passed per call, so no silent fallback to another one


def _check_3d(img: MetaTensor, path: str) -> MetaTensor:
    """Make a loaded volume exactly 3D (no channel), refusing 4D data."""
    shape = tuple(img.shape)
    if img.ndim == 4 and shape[-1] == 1:
        img = img[..., 0]  # trailing singleton 4th dimension (e.g. a 1-frame 4D NIfTI)
    elif img.ndim == 2:
        # one DICOM slice: a volume of depth 1, with the reader's full 4x4 affine (MetaTensor keeps
        # only a 3x3 one for 2D data)
        full = img.meta.get("original_affine")
        img = img[..., None]
        if full is not None and np.asarray(full).shape == (4, 4):
            img.affine = torch.as_tensor(np.asarray(full), dtype=torch.float64)
    if img.ndim != 3:
        raise DataError(
            f"{path}: expected a 3D volume but the image has shape {shape}; "
            "split multi-volume (4D) files into one 3D file per sequence"
        )
    img.meta["spatial_shape"] = np.asarray(img.shape)
    img.meta["original_channel_dim"] = float("nan")
    return img


def _dicom_num_frames(path: str) -> int:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"])
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _check_dicom_pixels(path: str) -> None:
    """DataError for a DICOM file without pixel data (report, RT structure set, presentation state ...)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:  # defer_size: element values over 1 KB (the pixels) are not read, only their presence is seen
        ds = pydicom.dcmread(path, defer_size="1 KB")
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError):
        return  # not readable as DICOM here: the image reader reports it
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = str(ds.get("Modality", "") or ds.get("SOPClassUID", "") or "?")
        raise DataError(
            f"{path}: DICOM file without pixel data (modality {kind}); point the path at the image series "
            "(e.g. the MR series folder), not at a report or structure set"
        )


def _read_3d(path: str, reader: str, series: str | None) -> MetaTensor:
    if reader not in READERS_3D:
        raise ValueError(f"reader must be one of {READERS_3D}, got {reader!r}")
    if os.path.isdir(path):
        info = select_dicom_series(path, series)
        if len(info.files) == 1:
            return _read_3d(info.files[0], reader, None)
        check_slice_spacing(path, info)
        if reader == "itk":
            rdr: ImageReader = ITKReader(series_name=_itk_series_name(path, info.files))
        else:
            import re

            # only the files of the chosen series; PydicomReader matches this against full paths
            regex = "^(" + "|".join(re.escape(os.path.join(path, os.path.basename(f))) for f in info.files) + ")$"
            rdr = PydicomReader(fname_regex=regex)
        img = _LOADER(path, reader=rdr)
        if img.ndim == 3 and img.shape[-1] != len(info.files):
            # PydicomReader skips slices without InstanceNumber: refuse a volume with holes
            raise DataError(
                f"{path}: only {img.shape[-1]} of the {len(info.files)} files of the DICOM series could be "
                "stacked (missing InstanceNumber?); try reader='itk' or repair the series"
            )
        return img
    if path_suffix(path) in NIFTI_SUFFIXES:
        img = _LOADER(path, reader=NibabelReader())
        if img.ndim == 2:  # a lone slice, unlike a single DICOM file (a documented depth-1 volume)
            raise DataError(
                f"{path}: expected a 3D volume but the NIfTI file is 2D with shape {tuple(img.shape)}; "
                "provide the whole volume or mark the modality missing"
            )
        return img
    if path_suffix(path) in ITK_ONLY_SUFFIXES:
        return _LOADER(path, reader=ITKReader())
    _check_dicom_pixels(path)
    # a single DICOM file; GDCM (ITK) handles enhanced multi-frame geometry (per-frame functional
    # groups) which monai's PydicomReader does not, so multi-frame files always go through ITK
    if reader == "itk" or _dicom_num_frames(path) > 1:
        return _LOADER(path, reader=ITKReader())
    return _LOADER(path, reader=PydicomReader())


def load_image(path: str | os.PathLike, kind: str, reader: str = "itk", series: str | None = None) -> MetaTensor:
    """Load one image modality as a channel-first ``MetaTensor`` (float32).

    Args:
        path: image file, NIfTI file, DICOM file or DICOM series folder.
        kind: ``"image2d"`` (RGB photo, output ``[3, H, W]``) or ``"image3d"`` (output ``[1, X, Y, Z]``).
        reader: DICOM reader, ``"itk"`` (default) or ``"pydicom"``; NIfTI and 2D files ignore it.
        series: for a DICOM folder holding several series, the SeriesInstanceUID (or unique suffix) or
            SeriesDescription to take.

    Returns:
        the image with geometry-only metadata (see :func:`strip_phi`).

    Raises:
        DataError: missing, unreadable, truncated or wrongly shaped file, ambiguous DICOM folder.
        ValueError: bad ``kind`` or ``reader``.

    Example:
        >>> img = load_image("case1/t1c.nii.gz", "image3d")  # doctest: +SKIP
        >>> img.shape  # [1, X, Y, Z]
    """
    # the normal form MONAI's LoadImage uses too (no "./", "~" expanded): the series file filter relies on it
    path = str(Path(os.fspath(path)).expanduser())
    if kind not in ("image2d", "image3d"):
        raise ValueError(f"kind must be 'image2d' or 'image3d', got {kind!r}")
    if reader not in READERS_3D:
        raise ValueError(f"reader must be one of {READERS_3D}, got {reader!r}")
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found; check the dataset folder and the case table")
    try:
        # no warnings.catch_warnings() here: it is not thread-safe and CacheDataset loads in threads
        if kind == "image2d":
            if os.path.isdir(path) or path_suffix(path) not in IMAGE_2D_SUFFIXES:
                raise DataError(f"{path}: not a 2D image file (expected one of {', '.join(IMAGE_2D_SUFFIXES)})")
            # reverse_indexing=False keeps numpy's (H, W) order, so the result is [3, H, W]
            img = _LOADER(path, reader=PILReader(converter=_rgb, reverse_indexing=False))
            img = EnsureChannelFirst(channel_dim=-1)(img)
        else:
            img = _check_3d(_read_3d(path, reader, series), path)
            img = EnsureChannelFirst(channel_dim="no_channel")(img)
    except DataError:
        raise
    except Exception as err:  # any library failure becomes one actionable line naming the file
        raise DataError(
            f"{path}: cannot read the {'image' if kind == 'image2d' else 'volume'} "
            f"({type(err).__name__}: {_one_line(err)}); the file may be truncated, corrupt or of an "
            "unsupported format - replace it or mark the modality missing"
        ) from None
    if not isinstance(img, MetaTensor):
        img = MetaTensor(img)
    img.meta = strip_phi(img.meta)
    return img.float()


class LoadModalityd(MapTransform):
    """Load each image modality key whose value is a path; missing ones (``None``) stay ``None``.

    Args:
        keys: the image modality keys (modality names) of the data dicts.
        kinds: modality kind per key (``"image2d"`` / ``"image3d"``), a mapping or a sequence aligned
            with ``keys``, or one kind for all.
        reader: DICOM reader, ``"itk"`` or ``"pydicom"``.
        series: DICOM series to take when a folder holds several: one selector for all keys or a
            mapping ``key -> selector`` (SeriesInstanceUID / suffix / SeriesDescription).
        case_key: key holding the case id, used in error messages.
        allow_missing_keys: don't raise when a key is absent from the dict.

    Example:
        >>> load = LoadModalityd(["clinic", "derm"], "image2d")
        >>> d = load({"case_id": "1", "clinic": None, "derm": "derm/1.jpg"})  # doctest: +SKIP
        >>> d["clinic"] is None, d["derm"].shape  # (True, torch.Size([3, H, W]))
    """

    def __init__(
        self,
        keys: KeysCollection,
        kinds: str | Sequence[str] | Mapping[Hashable, str],
        reader: str = "itk",
        series: str | Mapping[Hashable, str | None] | None = None,
        case_key: str = "case_id",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(kinds, str):
            kinds = {k: kinds for k in self.keys}
        elif not isinstance(kinds, Mapping):
            kinds = list(kinds)
            if len(kinds) != len(self.keys):
                raise ValueError(f"kinds {kinds} must have one entry per key {list(self.keys)}")
            kinds = dict(zip(self.keys, kinds))
        for k in self.keys:
            if kinds.get(k) not in ("image2d", "image3d"):
                raise ValueError(f"kind of modality {k!r} must be 'image2d' or 'image3d', got {kinds.get(k)!r}")
        if reader not in READERS_3D:
            raise ValueError(f"reader must be one of {READERS_3D}, got {reader!r}")
        self.kinds = dict(kinds)
        self.reader = reader
        self.series = series
        self.case_key = case_key

    def _series_for(self, key: Hashable) -> str | None:
        if isinstance(self.series, Mapping):
            return self.series.get(key)
        return self.series

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if path is None or isinstance(path, torch.Tensor):
                continue  # missing modality, or already loaded
            try:
                d[key] = load_image(path, self.kinds[key], reader=self.reader, series=self._series_for(key))
            except DataError as err:
                case = d.get(self.case_key)
                raise DataError(f"case {case}, modality {key}: {err}" if case is not None else str(err)) from None
        return d
