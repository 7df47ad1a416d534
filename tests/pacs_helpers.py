"""Shared by the PACS tests: real DICOM files rewritten into MR studies, and a tiny served MEN model.

The series are made from pydicom's and nibabel's test files (their headers and pixels): new UIDs, one
study, SeriesDescription T1c/T1/T2/FLAIR, axial slices at an even gap. A localizer and a derived
(projection) series from pydicom's ``dicomdirtests`` keep their ImageType and get descriptions that the
T1c/FLAIR rules would match, so only the exclusion rule keeps them out.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence

import nibabel
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage, Verification

from cmml_monai.deploy.listener import PacsNode

from bundle_helpers import ROOT, tiny_overrides, workflow

NIBABEL_DATA = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")
DICOMDIR_TESTS = os.path.dirname(get_testdata_file("DICOMDIR", read=False))
MEN_CONFIG = os.path.join(ROOT, "configs", "datasets", "men.json")
TRAIN = os.path.join(ROOT, "configs", "train.json")

MARKER = "ZZPHIMARKERZZ"
MARKER_DATE = "19010203"
#: every patient / visit identifier a PACS export carries; the PHI test puts the marker in each
PHI = {
    "PatientName": f"{MARKER}^Jane",
    "PatientID": MARKER,
    "PatientBirthDate": MARKER_DATE,
    "OtherPatientIDs": MARKER,
    "InstitutionName": MARKER,
    "InstitutionAddress": MARKER,
    "ReferringPhysicianName": f"{MARKER}^Doc",
    "PerformingPhysicianName": f"{MARKER}^Perf",
    "OperatorsName": f"{MARKER}^Op",
    "AccessionNumber": MARKER,
    "StudyID": MARKER[:16],
    "StationName": MARKER,
}
#: the attributes highdicom copies from the study into the SC (the marker may sit there, nowhere else)
STUDY_ATTRIBUTES = {
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
}
PLAIN_PATIENT = {
    "PatientName": "Test^Patient",
    "PatientID": "TP001",
    "PatientBirthDate": "19700101",
    "AccessionNumber": "ACC001",
    "ReferringPhysicianName": "Ref^Doc",
    "StudyID": "1",
}


def _slices(source: str, n: int, size: int) -> tuple[pydicom.Dataset, list[np.ndarray]]:
    """The header of ``source`` and ``n`` ``size`` x ``size`` int16 planes cut from its pixels."""
    ds = pydicom.dcmread(source)
    arr = np.asarray(ds.pixel_array, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[0]
    rows, cols = arr.shape
    step = max(1, min(rows, cols) // (size * 2))
    out = []
    for k in range(n):
        # a different window of the real image per slice: a volume with structure, not n copies
        r0 = min(rows - size * step, (k * 7 * step) % max(1, rows - size * step + 1))
        c0 = min(cols - size * step, (k * 5 * step) % max(1, cols - size * step + 1))
        plane = arr[r0 : r0 + size * step : step, c0 : c0 + size * step : step]
        out.append(np.clip(plane, -32768, 32767).astype(np.int16))
    return ds, out


def write_series(
    folder: str,
    sources: Sequence[str],
    description: str,
    study: dict,
    series_number: int,
    n: int = 4,
    size: int = 16,
    image_type: Sequence[str] | None = ("ORIGINAL", "PRIMARY", "AXIAL"),
    thickness: float = 2.0,
) -> list[str]:
    """Write ``n`` axial slices of one series into ``folder``, each from a real file of ``sources``
    (cycled): its header (private tags included) with new UIDs, geometry and ``study``'s patient/study
    attributes. ``image_type=None`` keeps the source's ImageType."""
    os.makedirs(folder, exist_ok=True)
    series_uid = generate_uid()
    paths = []
    for k in range(n):
        ds, planes = _slices(sources[k % len(sources)], k + 1, size)
        plane = planes[-1]
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        for kw in ("NumberOfFrames", "SliceLocation", "SpacingBetweenSlices"):
            if kw in ds:
                delattr(ds, kw)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study["uid"], series_uid
        ds.FrameOfReferenceUID = study["frame"]
        ds.Modality = "MR"
        ds.SeriesDescription = description
        ds.ProtocolName = description
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        if image_type is not None:
            ds.ImageType = list(image_type)
        ds.StudyDate, ds.StudyTime = "20240102", "101500"
        ds.PatientAge, ds.PatientSex, ds.PatientWeight = study.get("age", "045Y"), study.get("sex", "M"), 80
        for kw, value in study["patient"].items():
            setattr(ds, kw, value)
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, k * thickness]
        ds.PixelSpacing = [1.5, 1.5]
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = plane.tobytes()
        path = os.path.join(folder, f"{series_number:03d}_{k + 1:03d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


T1C_SRC = [get_testdata_file("MR_small.dcm")]
T1_SRC = [os.path.join(NIBABEL_DATA, "1.dcm")]
T2_SRC = [os.path.join(NIBABEL_DATA, "0.dcm")]
FLAIR_SRC = [os.path.join(DICOMDIR_TESTS, "98892003", "MR2", f) for f in ("4950", "4981", "5011", "6273")]
LOCALIZER_SRC = [os.path.join(DICOMDIR_TESTS, "98892001", "CT2N", f) for f in ("6293", "6924")]
DERIVED_SRC = [os.path.join(DICOMDIR_TESTS, "98892003", "MR700", f) for f in ("4467", "4528", "4558")]


def make_study(
    folder: str,
    sequences: Sequence[str] = ("T1c", "T1", "T2", "FLAIR"),
    patient: dict | None = None,
    decoys: bool = True,
    **study_extra,
) -> dict:
    """A study folder (one sub-folder per series, as PACS exports do) with the given sequences plus, with
    ``decoys``, a localizer described as a T1 post-contrast and a derived FLAIR projection, both numbered
    before the real series. Returns ``{"uid", "series": {name: [paths]}, "folder"}``."""
    study = {"uid": generate_uid(), "frame": generate_uid(), "patient": dict(patient or PLAIN_PATIENT), **study_extra}
    named = {
        "T1c": ("T1 MPRAGE post Gd", T1C_SRC),
        "T1": ("T1 SE axial", T1_SRC),
        "T2": ("T2 TSE axial", T2_SRC),
        "FLAIR": ("FLAIR axial", FLAIR_SRC),
    }
    series = {}
    if decoys:
        series["localizer"] = write_series(
            os.path.join(folder, "S1"), LOCALIZER_SRC, "T1 post contrast", study, 1, n=2, image_type=None
        )
        series["derived"] = write_series(
            os.path.join(folder, "S2"), DERIVED_SRC, "FLAIR MIP", study, 2, n=3, image_type=None
        )
    for i, name in enumerate(sequences):
        desc, src = named[name]
        series[name] = write_series(os.path.join(folder, f"S{10 + i}"), src, desc, study, 10 + i)
    return {"uid": study["uid"], "series": series, "folder": folder}


def trained_men_bundle(tmp_path_factory) -> str:
    """A tiny CMML model trained on synthetic MEN (8^3 voxels at 2 mm; t1c, t1n, t2w, t2f + age, sex): its
    run folder (``models/model.pt`` + ``models/network.json``). Trained once per test session."""
    from cmml_monai.data.synthetic import make_synthetic

    root = tmp_path_factory.getbasetemp() / "pacs_bundle"
    out = str(root / "run")
    if os.path.isfile(os.path.join(out, "models", "network.json")):
        return out
    data = str(root / "men")
    make_synthetic("men", data, cases=16, seed=0, shape=(8, 8, 8))
    args = tiny_overrides(
        data,
        out,
        synthetic=False,
        spatial_size=[8, 8, 8],
        pixdim=[2.0, 2.0, 2.0],
        run_sweep=False,
        missing_rates=[0.0],
        feature_dim=8,
        batch_size=4,
        val_batch_size=4,
        num_workers=0,
        device="cpu",
    )
    w = workflow([TRAIN, MEN_CONFIG], **args)
    w.run()
    w.finalize()
    return out


# -- the DICOM network ------------------------------------------------------------------------------
class Pacs:
    """A second Storage SCP acting as the PACS: keeps what it receives.

    Args:
        port: where it listens (0: a free port).
        accept_calling: the calling AE titles it accepts (None: any).
        ssl_context: TLS server context.
        sop_classes: the SOP classes it accepts (default Comprehensive SR).
        status: the C-STORE status it answers.
        delay: seconds it waits before answering each C-STORE (a slow PACS: time to kill the sender).
    """

    def __init__(
        self,
        port: int = 0,
        accept_calling: list[str] | None = None,
        ssl_context=None,
        sop_classes=(ComprehensiveSRStorage,),
        status: int = 0x0000,
        delay: float = 0.0,
    ) -> None:
        self.received: list[pydicom.Dataset] = []
        self.entered = threading.Event()
        self.status, self.delay = status, delay
        ae = AE(ae_title="PACS")
        for sop in sop_classes:
            ae.add_supported_context(sop)
        if accept_calling is not None:
            ae.require_calling_aet = accept_calling
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, ssl_context=ssl_context, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.node = PacsNode("127.0.0.1", self.server.server_address[1], "PACS")

    def _store(self, event) -> int:
        self.entered.set()
        if self.delay:
            time.sleep(self.delay)
        ds = event.dataset
        ds.file_meta = event.file_meta
        if self.status == 0x0000:
            self.received.append(ds)
        return self.status

    def by_study(self) -> dict[str, set[str]]:
        """StudyInstanceUID -> the distinct SOP Instance UIDs of the SRs stored for it."""
        out: dict[str, set[str]] = {}
        for ds in self.received:
            out.setdefault(ds.StudyInstanceUID, set()).add(ds.SOPInstanceUID)
        return out

    def stop(self) -> None:
        self.server.shutdown()


def wait_until(predicate, seconds: float = 60.0, step: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``seconds`` have passed; returns its last value."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send_study(
    files: list[str], port: int, release: bool = True, calling: str = "MODALITY", called: str = "CMML", tls=None
) -> None:
    """C-STORE ``files`` to the listener as a modality would (over TLS with ``tls``, an SSLContext)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=(tls, "localhost") if tls is not None else None)
    assert assoc.is_established
    for f in files:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
    if release:
        assoc.release()
    else:
        assoc.abort()


def series_files(study: dict, names: Sequence[str] | None = None) -> list[list[str]]:
    """The files of each series (``names``: those sequences), one list per series."""
    return [files for name, files in study["series"].items() if names is None or name in names]


def study_files(study: dict) -> list[str]:
    return [f for files in study["series"].values() for f in files]


def wait_for_scp(port: int, seconds: float = 120) -> None:
    """Return once a C-ECHO to 127.0.0.1:``port`` succeeds (a listener started in another process)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assoc = ae.associate("127.0.0.1", port, ae_title="CMML")
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.5)
    raise AssertionError(f"no DICOM listener on port {port} after {seconds} s")


def make_cert(folder: str, name: str = "node") -> tuple[str, str]:
    """A self-signed certificate for localhost / 127.0.0.1 (cryptography): ``(cert.pem, key.pem)``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(folder, exist_ok=True)
    cert_path, key_path = os.path.join(folder, f"{name}.crt"), os.path.join(folder, f"{name}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path
