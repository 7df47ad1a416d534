"""Scan: the DICOM files of a folder, a DICOMDIR or a mixed export grouped into studies and series.

Headers only (pydicom, ``stop_before_pixels``); no patient identifier leaves :attr:`Study.header`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from cmml_monai.data.errors import DataError

__all__ = ["SeriesInfo", "Study", "find_dicom_files", "scan_studies", "load_study"]

_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


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
    found: list[str] = []
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
