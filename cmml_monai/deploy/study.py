"""A DICOM study as one case of the served network, without any SDK.

A study folder (searched recursively), a DICOMDIR, or a folder mixing the files of several studies is read
header-only (pydicom, ``stop_before_pixels``) and grouped by StudyInstanceUID and SeriesInstanceUID. Each
image modality of the served network gets one series by :class:`SeriesRules` (regular expressions on
SeriesDescription, then ProtocolName; localizers and derived series excluded by ImageType), the selected
series are checked (pixel data, one orientation, one pixel spacing, even slice gaps) and read by the same
transforms the network was trained with (:func:`cmml_monai.deploy.inference.inference_dataset`), so the
result is exactly the batch the served network takes, NaN for a missing sequence or clinical value.

Patient identifiers stay in :attr:`Study.header` (used by the DICOM report only); logs and errors name a
case by the caller's id or a pseudonym, and series by number and description.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cmml_monai.data.cases import Case, CaseList, ModalitySpec
from cmml_monai.data.dataset import collate_cases
from cmml_monai.data.errors import DataError
from cmml_monai.data.readers import SPACING_TOLERANCE
from cmml_monai.data.table import read_table
from cmml_monai.deploy.inference import inference_dataset

__all__ = [
    "DEFAULT_RULES",
    "MODALITY_ALIASES",
    "EXCLUDED_IMAGE_TYPES",
    "EXCLUDED_DESCRIPTION",
    "HEADER_COLUMNS",
    "IRREGULAR",
    "SeriesInfo",
    "Study",
    "SeriesRules",
    "ClinicalSource",
    "StudyCase",
    "find_dicom_files",
    "scan_studies",
    "load_study",
    "MAX_VOXELS",
    "check_series",
    "resample_series",
    "pseudonym",
    "header_clinical_values",
    "study_case",
]

logger = logging.getLogger(__name__)

_B, _E = r"(?<![a-z0-9])", r"(?![a-z0-9])"  # token edges: "t1_post" and "T1 post" both split at "_"/" "
_CONTRAST = rf"({_B}(post|contrast|gad|gado|gd|ce|km|mdc){_E}|\+ ?c{_E}|\+ ?gd)"
#: per sequence: regexes tried in this order (case-insensitive) on SeriesDescription then ProtocolName,
#: and regexes that disqualify a series for it. The first regex that matches a series wins.
DEFAULT_RULES: dict[str, dict[str, list[str]]] = {
    "T1c": {
        "match": [
            rf"{_B}t1[ _-]?(c|ce|gd|km){_E}",
            rf"{_B}t1.*{_CONTRAST}",
            rf"{_CONTRAST}.*{_B}t1",
            rf"{_B}(mprage|spgr|bravo|vibe).*{_CONTRAST}",
        ],
        "exclude": [r"flair"],
    },
    "T1": {
        "match": [rf"{_B}t1[ _-]?(n|w|weighted|native|pre)?{_E}", rf"{_B}t1", rf"{_B}(mprage|spgr|bravo){_E}"],
        "exclude": [_CONTRAST, r"flair", rf"{_B}t1[ _-]?c{_E}"],
    },
    "T2": {
        "match": [rf"{_B}t2[ _-]?(w|weighted|tse|fse|space)?{_E}", rf"{_B}t2"],
        "exclude": [
            r"flair",
            r"dark[ _-]?fluid",
            rf"{_B}t2[ _-]?(f|\*|star){_E}",
            r"t2\*",
            rf"{_B}(swi|gre|haste){_E}",
        ],
    },
    "FLAIR": {
        "match": [r"flair", rf"{_B}t2[ _-]?f{_E}", r"dark[ _-]?fluid"],
        "exclude": [],
    },
}
#: model modality name (lower case) -> sequence of :data:`DEFAULT_RULES` (MEN/BraTS names included)
MODALITY_ALIASES = {
    "t1c": "T1c",
    "t1ce": "T1c",
    "t1gd": "T1c",
    "t1": "T1",
    "t1n": "T1",
    "t1w": "T1",
    "t2": "T2",
    "t2w": "T2",
    "flair": "FLAIR",
    "t2f": "FLAIR",
}
#: a series whose ImageType holds one of these is never a model input: scouts, reformats, projections
EXCLUDED_IMAGE_TYPES = ("LOCALIZER", "DERIVED", "SECONDARY", "PROJECTION IMAGE")
#: a series whose description or protocol matches this is never a model input (scanners that do not mark
#: localizers in ImageType)
EXCLUDED_DESCRIPTION = r"locali[sz]er|scout|survey|3[ -]?plane|pilot|calibration"
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
_ORIENTATION_TOLERANCE = 1e-3
#: what :func:`study_case` does with a series whose slices are not evenly spaced
IRREGULAR = ("refuse", "resample")


@dataclass
class SeriesInfo:
    """One series of a study, from the headers of its files (no patient identifiers).

    Args:
        uid: SeriesInstanceUID.
        number: SeriesNumber (None when absent).
        description: SeriesDescription ("" when absent).
        protocol: ProtocolName ("" when absent).
        modality: Modality ("MR", "CT", ...).
        image_type: ImageType values, upper case.
        files: the files holding images of the series (sorted).
        sop_instance_uids: per file, its SOPInstanceUID.
        sop_class_uids: per file, its SOPClassUID.
    """

    uid: str
    number: int | None = None
    description: str = ""
    protocol: str = ""
    modality: str = ""
    image_type: tuple[str, ...] = ()
    files: list[str] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)
    sop_class_uids: list[str] = field(default_factory=list)

    def label(self) -> str:
        """``series 3 'T1 post' (20 files)`` for logs and errors."""
        number = self.number if self.number is not None else "?"
        return f"series {number} {self.description!r} ({len(self.files)} files)"


@dataclass
class Study:
    """One DICOM study: its series (image series only) and the header of one of its files.

    ``header`` (a pydicom Dataset without pixel data) holds the patient and study attributes; it is used to
    file the DICOM report with the study and for clinical values, and must never be logged or written
    anywhere else.
    """

    uid: str
    series: list[SeriesInfo]
    header: Any


def find_dicom_files(path: str | os.PathLike) -> list[str]:
    """The files to read for ``path``: a DICOMDIR (the file, or a folder holding one at its top) gives the
    files it references; any other folder is searched recursively; a file is itself.

    Raises:
        DataError: ``path`` does not exist or the DICOMDIR cannot be read.

    Example:
        >>> find_dicom_files("/exports/study_0001")[:1]  # doctest: +SKIP
        ['/exports/study_0001/DICOM/IM0001']
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.fileset import FileSet

    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist; pass a DICOM study folder or a DICOMDIR")
    dicomdir = path if os.path.basename(path).upper() == "DICOMDIR" and os.path.isfile(path) else None
    if dicomdir is None and os.path.isdir(path) and os.path.isfile(os.path.join(path, "DICOMDIR")):
        dicomdir = os.path.join(path, "DICOMDIR")
    if dicomdir is not None:
        try:
            fs = FileSet(pydicom.dcmread(dicomdir))
        except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError) as e:
            raise DataError(f"{dicomdir}: cannot read the DICOMDIR ({e}); pass the folder of the files instead") from e
        files = sorted({os.fspath(inst.path) for inst in fs})
        return [f for f in files if os.path.isfile(f)]
    if os.path.isfile(path):
        return [path]
    found = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        found.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
    return found


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def scan_studies(path: str | os.PathLike) -> list[Study]:
    """Group the DICOM image files under ``path`` by study and series (headers only).

    Files that are not DICOM, DICOMDIRs and instances without an image (Rows), e.g. an earlier report,
    are skipped.

    Raises:
        DataError: no DICOM image file under ``path``.

    Example:
        >>> [len(s.series) for s in scan_studies("/exports/mixed")]  # doctest: +SKIP
        [4, 2]
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = os.fspath(path)
    studies: dict[str, dict[str, SeriesInfo]] = {}
    headers: dict[str, Any] = {}
    for f in find_dicom_files(path):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
            continue  # not DICOM (readme, thumbnails): exports hold such files
        if str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS:
            continue
        study_uid, series_uid = str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or "")
        if not study_uid or not series_uid or ds.get("Rows") is None:
            continue
        series = studies.setdefault(study_uid, {})
        headers.setdefault(study_uid, ds)
        info = series.get(series_uid)
        if info is None:
            info = series[series_uid] = SeriesInfo(
                uid=series_uid,
                number=_int_or_none(ds.get("SeriesNumber")),
                description=str(ds.get("SeriesDescription", "") or "").strip(),
                protocol=str(ds.get("ProtocolName", "") or "").strip(),
                modality=str(ds.get("Modality", "") or ""),
                image_type=tuple(str(v).strip().upper() for v in (ds.get("ImageType") or [])),
            )
        info.files.append(f)
        info.sop_instance_uids.append(str(ds.get("SOPInstanceUID", "")))
        info.sop_class_uids.append(str(ds.get("SOPClassUID", "")))
    if not studies:
        raise DataError(f"{path}: no DICOM image file found (searched recursively); pass a DICOM study folder")
    out = []
    for uid, series in studies.items():
        ordered = sorted(series.values(), key=lambda s: (s.number is None, s.number or 0, s.uid))
        out.append(Study(uid, ordered, headers[uid]))
    return out


def load_study(path: str | os.PathLike) -> Study:
    """The one study under ``path``.

    Raises:
        DataError: no DICOM image, or files of several studies (use :func:`scan_studies` to take each).

    Example:
        >>> load_study("/exports/study_0001").series[0].description  # doctest: +SKIP
        'T1 MPRAGE post Gd'
    """
    studies = scan_studies(path)
    if len(studies) != 1:
        sizes = ", ".join(f"{sum(len(s.files) for s in st.series)} files" for st in studies)
        raise DataError(
            f"{os.fspath(path)} holds {len(studies)} studies ({sizes}) where one was expected; "
            "pass one study's folder or process each study (--each-study)"
        )
    return studies[0]


class SeriesRules:
    """Which series of a study is which model modality.

    Args:
        rules: model modality name -> ``{"match": [regex, ...], "exclude": [regex, ...]}``, or a sequence
            name of :data:`DEFAULT_RULES` (``"T1c"``, ``"T1"``, ``"T2"``, ``"FLAIR"``). Regexes are
            case-insensitive and searched in SeriesDescription, then ProtocolName. Modalities not given use
            the defaults of their alias (:data:`MODALITY_ALIASES`: ``t1c``, ``t1n``/``t1``,
            ``t2w``/``t2``, ``t2f``/``flair``).
        excluded_image_types: ImageType values that exclude a series (localizers, reformats).
        excluded_description: regex excluding a series by description or protocol.
        modalities: DICOM Modality values accepted (``None``: any).

    Selection, per model modality in the network's order: the series not excluded, not taken by an
    earlier modality, not matching an ``exclude`` regex; the first ``match`` regex that matches any of them
    decides; among the series it matches, the lowest SeriesNumber wins (then the SeriesInstanceUID).

    Raises:
        ValueError: a modality without rule and without alias, or a regex that does not compile.

    Example:
        >>> rules = SeriesRules({"t2f": {"match": ["dark fluid"]}})
        >>> rules.rule_for("t1c")["match"][0].startswith("(?<!")
        True
    """

    def __init__(
        self,
        rules: Mapping[str, Mapping[str, Sequence[str]] | str] | None = None,
        excluded_image_types: Sequence[str] = EXCLUDED_IMAGE_TYPES,
        excluded_description: str | None = EXCLUDED_DESCRIPTION,
        modalities: Sequence[str] | None = ("MR",),
    ) -> None:
        self.rules: dict[str, dict[str, list[str]]] = {}
        for name, rule in (rules or {}).items():
            if isinstance(rule, str):
                if rule not in DEFAULT_RULES:
                    raise ValueError(f"series rule {name!r}: {rule!r} is not one of {sorted(DEFAULT_RULES)}")
                rule = DEFAULT_RULES[rule]
            if not isinstance(rule, Mapping) or not rule.get("match"):
                raise ValueError(f"series rule {name!r} must have a non-empty 'match' list, got {rule!r}")
            self.rules[str(name)] = {
                "match": [str(r) for r in rule["match"]],
                "exclude": [str(r) for r in rule.get("exclude", [])],
            }
        for name, rule in self.rules.items():
            for regex in [*rule["match"], *rule["exclude"]]:
                try:
                    re.compile(regex)
                except re.error as e:
                    raise ValueError(f"series rule {name!r}: regex {regex!r} does not compile ({e})") from e
        self.excluded_image_types = tuple(str(t).upper() for t in excluded_image_types)
        self.excluded_description = excluded_description
        self.modalities = None if modalities is None else tuple(str(m).upper() for m in modalities)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SeriesRules:
        """From ``{"rules": {...}, "excluded_image_types": [...], "excluded_description": ..., "modalities": [...]}``
        (every key optional), e.g. a ``--rules`` file."""
        known = {"rules", "excluded_image_types", "excluded_description", "modalities"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"series rules: unknown keys {unknown}; use {sorted(known)}")
        return cls(**dict(data))

    def rule_for(self, modality: str) -> dict[str, list[str]]:
        """The rule of a model modality (its own, or the default of its alias)."""
        if modality in self.rules:
            return self.rules[modality]
        alias = MODALITY_ALIASES.get(modality.lower())
        if alias is None:
            raise ValueError(
                f"no series rule for modality {modality!r} and no default (defaults: {sorted(MODALITY_ALIASES)}); "
                "give one in the series rules"
            )
        return DEFAULT_RULES[alias]

    def excluded(self, series: SeriesInfo) -> str | None:
        """Why ``series`` can never be a model input (None when it can)."""
        if self.modalities is not None and series.modality.upper() not in self.modalities:
            return f"Modality {series.modality or '?'} is not {'/'.join(self.modalities)}"
        bad = [t for t in series.image_type if t in self.excluded_image_types]
        if bad:
            return f"ImageType {'/'.join(bad)}"
        text = f"{series.description}\n{series.protocol}"
        if self.excluded_description and re.search(self.excluded_description, text, re.IGNORECASE):
            return "a localizer by its description"
        return None

    def select(self, study: Study, modalities: Sequence[str], case: str = "case") -> dict[str, SeriesInfo | None]:
        """Model modality -> its series in ``study`` (None when no series matches: the modality is missing).

        Logged: each excluded series that a rule would have matched (once), each missing modality (once).
        """
        taken: set[str] = set()
        out: dict[str, SeriesInfo | None] = {}
        reported: set[str] = set()
        for modality in modalities:
            rule = self.rule_for(modality)
            chosen = None
            for regex in rule["match"]:
                hits = []
                for s in study.series:
                    if s.uid in taken:
                        continue
                    text = f"{s.description}\n{s.protocol}"
                    if not re.search(regex, text, re.IGNORECASE):
                        continue
                    if any(re.search(x, text, re.IGNORECASE) for x in rule["exclude"]):
                        continue
                    why = self.excluded(s)
                    if why is not None:
                        if s.uid not in reported:
                            reported.add(s.uid)
                            logger.info("%s: %s excluded for %s: %s", case, s.label(), modality, why)
                        continue
                    hits.append(s)
                if hits:
                    chosen = hits[0]  # study.series is ordered by SeriesNumber, then UID
                    break
            out[modality] = chosen
            if chosen is None:
                logger.warning("%s: no series matches %s; it is missing", case, modality)
            else:
                taken.add(chosen.uid)
                logger.info("%s: %s <- %s", case, modality, chosen.label())
        return out


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

    slices = []
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


def pseudonym(value: str, key: str | bytes, length: int = 16) -> str:
    """A keyed hash (HMAC-SHA256) of ``value``: the same value and key give the same pseudonym; without the
    key it cannot be traced back.

    Raises:
        ValueError: an empty key.

    Example:
        >>> pseudonym("1.2.3", "secret")
        '48df62b60b2d7da8'
    """
    key_bytes = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if not key_bytes:
        raise ValueError(f"the pseudonym key must not be empty, got {key!r}")
    return hmac.new(key_bytes, str(value).encode("utf-8"), hashlib.sha256).hexdigest()[: int(length)]


def _age_years(value: Any) -> float | None:
    """DICOM AS (``045Y``, ``006M``, ``020W``, ``003D``) -> years."""
    m = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY]?)\s*", str(value or ""), re.IGNORECASE)
    if not m:
        return None
    n, unit = float(m.group(1)), (m.group(2) or "Y").upper()
    return {"Y": n, "M": n / 12.0, "W": n * 7 / 365.25, "D": n / 365.25}[unit]


_SEX_WORDS = {
    "M": ("M", "male", "Male", "m", "man"),
    "F": ("F", "female", "Female", "f", "woman"),
    "O": ("O", "other", "Other", "o"),
}


def _sex_value(code: Any, vocabulary: Sequence[str] | None) -> str | None:
    """PatientSex (M/F/O) in the words the network was trained with (e.g. ``male``/``female``)."""
    c = str(code or "").strip().upper()
    if c not in _SEX_WORDS:
        return None
    for word in _SEX_WORDS[c]:
        if vocabulary is None or word in vocabulary:
            return word
    return c


#: clinical column -> the header attribute it comes from by default
HEADER_COLUMNS = {"age": "PatientAge", "sex": "PatientSex", "weight": "PatientWeight", "height": "PatientSize"}


def header_clinical_values(
    header: Any,
    columns: Sequence[str],
    vocabularies: Mapping[str, Sequence[str]] | None = None,
    attributes: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Clinical values of ``columns`` from a DICOM header: age in years, sex in the trained words, weight kg,
    height (PatientSize) in m; None where the header has nothing.

    Args:
        header: a pydicom Dataset of the study.
        columns: the network's table columns.
        vocabularies: categorical column -> the trained categories.
        attributes: column -> DICOM keyword, over :data:`HEADER_COLUMNS`.

    Example:
        >>> header_clinical_values(ds, ["age", "sex"], {"sex": ["female", "male"]})  # doctest: +SKIP
        {'age': 45.0, 'sex': 'male'}
    """
    attrs = {**HEADER_COLUMNS, **dict(attributes or {})}
    vocab = dict(vocabularies or {})
    out: dict[str, Any] = {}
    for col in columns:
        keyword = attrs.get(col)
        raw = header.get(keyword) if keyword else None
        if keyword == "PatientAge":
            out[col] = _age_years(raw)
        elif keyword == "PatientSex":
            out[col] = _sex_value(raw, vocab.get(col))
        elif raw is None or str(raw).strip() == "":
            out[col] = None
        else:
            try:
                out[col] = float(raw)
            except (TypeError, ValueError):
                out[col] = str(raw)
    return out


@dataclass
class ClinicalSource:
    """Where a study's clinical values come from.

    Args:
        csv: a CSV/XLSX table; ``None`` takes them from the DICOM header (:func:`header_clinical_values`).
        id_column: the table's id column.
        key_attribute: DICOM keyword whose value keys the row (e.g. ``AccessionNumber``); ``None`` keys it by
            the case id (the caller's id or the pseudonym).
        attributes: header mode: column -> DICOM keyword, over :data:`HEADER_COLUMNS`.

    Example:
        >>> ClinicalSource(csv="clinical.csv", id_column="case_id")  # doctest: +SKIP
    """

    csv: str | None = None
    id_column: str = "case_id"
    key_attribute: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    def values(
        self, header: Any, case_id: str, columns: Sequence[str], vocabularies: Mapping[str, Sequence[str]] | None = None
    ) -> dict[str, Any]:
        """The clinical values of one study (None where unknown).

        Raises:
            DataError: the table lacks the id column or a column the network takes.
        """
        if self.csv is None:
            return header_clinical_values(header, columns, vocabularies, self.attributes)
        df = read_table(self.csv, required=[self.id_column, *columns])
        key = case_id if self.key_attribute is None else str(header.get(self.key_attribute, "") or "")
        ids = df[self.id_column].map(lambda v: str(v).strip())
        rows = df[ids == str(key).strip()]
        if rows.empty:
            # the key may be an identifier: the message names the case, not the key
            logger.warning("%s: no row in the clinical table; its clinical values are missing", case_id)
            return {c: None for c in columns}
        row = rows.iloc[0]
        out = {}
        for c in columns:
            v = row[c]
            out[c] = None if v is None or (isinstance(v, float) and math.isnan(v)) else v
        return out


@dataclass
class StudyCase:
    """A study turned into one case of the served network.

    Args:
        case_id: the caller's id or the pseudonym (never a patient identifier).
        batch: the network's batch of one case: ``image`` ``[1, C, *spatial]`` (NaN where missing),
            ``tabular`` ``[1, F]`` or absent, ``case_id``.
        selection: model image modality -> the series used (None: missing).
        clinical: the raw clinical values used (None: missing).
        study: the study (its ``header`` carries PHI: for the DICOM report only).
    """

    case_id: str
    batch: dict[str, Any]
    selection: dict[str, SeriesInfo | None]
    clinical: dict[str, Any]
    study: Study

    @property
    def present_images(self) -> list[str]:
        return [m for m, s in self.selection.items() if s is not None]


def _link_series(series: SeriesInfo, folder: str) -> str:
    """A folder holding only ``series``' files (links; copies where links are not allowed), so the
    training readers read it as one DICOM series folder."""
    os.makedirs(folder)
    for i, f in enumerate(series.files):
        dest = os.path.join(folder, f"{i:05d}.dcm")
        try:
            os.symlink(os.path.abspath(f), dest)
        except OSError:
            shutil.copyfile(f, dest)
    return folder


def study_case(
    study: Study,
    description: Mapping[str, Any],
    case_id: str,
    rules: SeriesRules | None = None,
    clinical: ClinicalSource | None = None,
    work_dir: str | None = None,
    irregular: str = "refuse",
) -> StudyCase:
    """The batch the served network takes for ``study``.

    Args:
        study: from :func:`load_study` / :func:`scan_studies`.
        description: :func:`cmml_monai.deploy.load_description` of the served model (modalities,
            table schema, preprocessing).
        case_id: how logs and outputs name the case (the caller's id or :func:`pseudonym`).
        rules: series selection (default :class:`SeriesRules` ()).
        clinical: where clinical values come from (default the DICOM header).
        work_dir: where the series folders are linked while reading (default a temporary folder, removed).
        irregular: a selected series whose slices are not evenly spaced: ``"refuse"`` (an error) or
            ``"resample"`` (:func:`resample_series`, said in the log).

    Raises:
        DataError: a selected series without pixel data or of irregular geometry, or no modality at all.
        ValueError: ``irregular`` is neither ``"refuse"`` nor ``"resample"``.

    Example:
        >>> desc = load_description("bundle/models")  # doctest: +SKIP
        >>> case = study_case(load_study("/exports/s1"), desc, "case-001")
        >>> case.batch["image"].shape
        torch.Size([1, 4, 96, 96, 96])
    """
    if irregular not in IRREGULAR:
        raise ValueError(f"irregular must be one of {IRREGULAR}, got {irregular!r}")
    rules = rules or SeriesRules()
    clinical = clinical or ClinicalSource()
    data = description["data"]
    mods = [ModalitySpec(m["name"], m["kind"], int(m["channels"])) for m in data["modalities"]]
    image_mods = [m for m in mods if m.kind != "table"]
    if any(m.kind != "image3d" for m in image_mods):
        raise DataError(
            f"the served model takes {[m.kind for m in image_mods]} images; DICOM studies give "
            "3D volumes (image3d) only"
        )
    selection = rules.select(study, [m.name for m in image_mods], case_id)
    uneven = {m for m, s in selection.items() if s is not None and check_series(s, irregular == "resample")}
    columns = [str(c) for c in data.get("table_columns") or []]
    vocab = {
        c["name"]: c.get("vocabulary", [])
        for c in (data.get("table_schema") or {}).get("columns", [])
        if c.get("type") == "categorical"
    }
    values = clinical.values(study.header, case_id, columns, vocab) if columns else {}
    if all(s is None for s in selection.values()) and all(v is None for v in values.values()):
        raise DataError(
            f"{case_id}: no series matches any of {[m.name for m in image_mods]} and no clinical "
            "value is known; check the series rules (--rules)"
        )
    own_dir = work_dir is None
    work = tempfile.mkdtemp(prefix="cmml-study-") if own_dir else os.fspath(work_dir)
    try:
        paths: dict[str, str | None] = {}
        for m, s in selection.items():
            if s is None:
                paths[m] = None
            elif m in uneven:
                paths[m] = os.path.join(work, f"{m}.nii.gz")
                gap = resample_series(s, paths[m])
                logger.warning(
                    "%s: %s has unevenly spaced slices; resampled to an even %.3g mm gap for %s",
                    case_id,
                    s.label(),
                    gap,
                    m,
                )
            else:
                paths[m] = _link_series(s, os.path.join(work, m))
        reasons = {m: "no matching series" for m, p in paths.items() if p is None}
        case = Case(case_id, "", paths, None, values, reasons)
        case_list = CaseList(
            data.get("dataset", "study"), mods, list(data["class_names"]), bool(data["multi_label"]), columns, [case]
        )
        item = inference_dataset(description, case_list)[0]
        batch = collate_cases([item])
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
    return StudyCase(case_id, batch, selection, values, study)
