"""The DICOM listener (cmml_monai.deploy.listener) between sending modalities and a PACS, all pynetdicom on
127.0.0.1: studies go in by C-STORE (whole studies, collected across associations), only from invited
peers, optionally over TLS; the SR comes out at the PACS through the outbox."""

from __future__ import annotations

import json
import logging
import os

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage, MRImageStorage, Verification

from cmml_monai.deploy.access import Access, client_tls, server_tls
from cmml_monai.deploy.listener import OUTBOX, Listener, PacsError, PacsNode, send_sr
from cmml_monai.deploy.outbox import QUARANTINE, REFUSED
from cmml_monai.deploy.pipeline import StudyPipeline
from cmml_monai.deploy.report import read_sr_result

from pacs_helpers import (
    Pacs,
    free_port,
    make_cert,
    make_study,
    send_study,
    series_files,
    study_files,
    trained_men_bundle,
    wait_until,
)

LOGGER = "cmml_monai.deploy"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return trained_men_bundle(tmp_path_factory)


def _node(bundle, out, pacs, **kw) -> Listener:
    kw = {"port": 0, "access": Access(("MODALITY",)), "stable_age": 0.5, "retry_interval": 0.2, **kw}
    return Listener(StudyPipeline(bundle, str(out), key="k"), pacs, **kw)


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER)]


def test_listener_receives_a_study_and_the_pacs_receives_its_sr(bundle, tmp_path):
    study = make_study(str(tmp_path / "study"), ("T1c", "T2"))
    pacs = Pacs()
    node = _node(bundle, tmp_path / "out", pacs.node)
    node.start()
    try:
        send_study(study_files(study), node.port)
        assert wait_until(lambda: pacs.received and not os.listdir(tmp_path / "out" / OUTBOX), 60)
    finally:
        node.stop()
        pacs.stop()
    (sr,) = pacs.received
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    assert sr.StudyInstanceUID == study["uid"] and sr.PatientID == "TP001"  # filed with the study
    refs = {
        r.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for r in s.ReferencedSOPSequence
    }
    used = {pydicom.dcmread(f).SOPInstanceUID for name in ("T1c", "T2") for f in study["series"][name]}
    assert refs == used  # every instance of the series used, nothing of the localizer or derived
    got = read_sr_result(sr)
    assert sorted(got["present"]) == ["t1c", "t2w", "table"] and got["completed"] == ["t1n", "t2f"]
    assert got["prediction"] == [max(got["probabilities"], key=got["probabilities"].get)]
    # the received images (PHI) are gone once processed
    assert os.listdir(tmp_path / "out" / "incoming") == []


def test_a_study_sent_one_series_per_association_gives_one_sr(bundle, tmp_path, caplog):
    """Scanners and PACS forward a study series by series: one SR from all of them, not one per series."""
    study = make_study(str(tmp_path / "study"), ("T1c", "T1", "T2", "FLAIR"), decoys=False)
    pacs = Pacs()
    node = _node(bundle, tmp_path / "out", pacs.node, stable_age=1.5)
    node.start()
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            for files in series_files(study):
                send_study(files, node.port)  # one association per series, well within the stable age
            assert wait_until(lambda: pacs.received and node.results, 60)
            wait_until(lambda: False, 2.0)  # a second SR would come within this
    finally:
        node.stop()
        pacs.stop()
    (sr,) = pacs.received
    got = read_sr_result(sr)
    assert sorted(got["present"]) == ["t1c", "t1n", "t2f", "t2w", "table"] and got["completed"] == []
    assert len(node.results) == 1 and any("once quiet for 1.5 s" in m for m in _lines(caplog))


def test_a_study_received_again_is_skipped_or_a_new_version(bundle, tmp_path, caplog):
    study = make_study(str(tmp_path / "study"), ("T1c", "T2"), decoys=False)
    extra = make_study(str(tmp_path / "extra"), ("FLAIR",), decoys=False)
    flair = []
    for f in extra["series"]["FLAIR"]:  # a FLAIR series of the same study, sent later
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study["uid"]
        ds.save_as(f)
        flair.append(f)
    pacs = Pacs()
    out = tmp_path / "out"
    node = _node(bundle, out, pacs.node)
    node.start()
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            send_study(study_files(study), node.port)
            assert wait_until(lambda: len(pacs.received) == 1 and len(node.results) == 1, 60)
            send_study(study_files(study), node.port)  # identical: skipped
            assert wait_until(lambda: len(node.results) == 2, 60)
            send_study(study_files(study) + flair, node.port)  # other content: version 2
            assert wait_until(lambda: len(pacs.received) == 2 and len(node.results) == 3, 60)
    finally:
        node.stop()
        pacs.stop()
    assert node.results[1][0] == "skipped"
    first, second = pacs.received
    case = os.path.basename(node.results[0][0])[: -len(".sr.dcm")]
    assert [os.path.basename(p) for p in node.results[2]] == [f"{case}.v2.sr.dcm", f"{case}.v2.json"]
    assert os.path.isfile(out / f"{case}.sr.dcm")  # version 1 kept, never overwritten
    # the new SR names the one it replaces
    assert (
        second.PredecessorDocumentsSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == first.SOPInstanceUID
    )
    assert json.load(open(out / f"{case}.v2.json"))["replaces"] == [first.SOPInstanceUID]
    assert "t2f" in read_sr_result(second)["present"]
    lines = _lines(caplog)
    assert sum(f"{case}: received again, identical to version 1: skipped" in m for m in lines) == 1
    assert sum(f"{case}: received again with other content: version 2 replaces version 1" in m for m in lines) == 1


def _associate(port: int, calling: str, called: str = "CMML"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    return ae.associate("127.0.0.1", port, ae_title=called)


def test_only_invited_peers(bundle, tmp_path, caplog):
    node = _node(bundle, tmp_path / "out", None)
    node.start()
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            evil = _associate(node.port, "EVIL")
            wrong_called = _associate(node.port, "MODALITY", called="SOMEONE")
            good = _associate(node.port, "MODALITY")
            assert good.is_established and good.send_c_echo().Status == 0
            good.release()
    finally:
        node.stop()
    assert node.host == "127.0.0.1"  # not every interface unless asked
    for assoc, reason in ((evil, 0x03), (wrong_called, 0x07)):
        rsp = assoc.acceptor.primitive
        assert assoc.is_rejected and (rsp.result, rsp.result_source, rsp.diagnostic) == (0x01, 0x01, reason)
    lines = _lines(caplog)
    assert sum("rejected: calling AE title 'EVIL' is not on the allowlist" in m for m in lines) == 1
    assert sum("rejected: called AE title 'SOMEONE' is not this node's 'CMML'" in m for m in lines) == 1
    # an address not on the list is disconnected before any DICOM
    node = _node(bundle, tmp_path / "out2", None, access=Access(("MODALITY",), ("10.9.9.0/24",)))
    node.start()
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert not _associate(node.port, "MODALITY").is_established
    finally:
        node.stop()
    assert any("connection from 127.0.0.1 refused: the address is not on the allowlist" in m for m in _lines(caplog))


def test_tls_both_ways(bundle, tmp_path):
    cert, key = make_cert(str(tmp_path / "tls"), "node")
    pacs_cert, pacs_key = make_cert(str(tmp_path / "tls"), "pacs")
    study = make_study(str(tmp_path / "study"), ("T1c",), decoys=False)
    pacs = Pacs(ssl_context=server_tls(pacs_cert, pacs_key))
    node = _node(bundle, tmp_path / "out", pacs.node, tls=server_tls(cert, key), pacs_tls=client_tls(ca=pacs_cert))
    node.start()
    try:
        assert not _associate(node.port, "MODALITY").is_established  # plain TCP is not spoken
        send_study(study_files(study), node.port, tls=client_tls(ca=cert))
        assert wait_until(lambda: pacs.received, 60)
    finally:
        node.stop()
        pacs.stop()
    assert pacs.received[0].StudyInstanceUID == study["uid"]


def test_damaged_outbox_entries_are_quarantined_and_the_rest_delivered(bundle, tmp_path, caplog):
    study = make_study(str(tmp_path / "study"), ("T1c",), decoys=False)
    out = tmp_path / "out"
    ((sr_path, _),) = StudyPipeline(bundle, str(out), key="k").run(study["folder"])
    box = out / OUTBOX
    box.mkdir()
    (box / "a-empty.sr.dcm").write_bytes(b"")
    (box / "b-text.sr.dcm").write_text("not dicom")
    (box / "c-half.sr.dcm").write_bytes(open(sr_path, "rb").read()[:300])
    (box / "d-good.sr.dcm").write_bytes(open(sr_path, "rb").read())
    pacs = Pacs()
    node = _node(bundle, out, pacs.node)
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        node.start()  # the damaged entries do not stop the start
        try:
            assert wait_until(lambda: pacs.received and not node.outbox.pending(), 30)
        finally:
            node.stop()
            pacs.stop()
    assert len(pacs.received) == 1 and pacs.received[0].StudyInstanceUID == study["uid"]
    assert sorted(os.listdir(box / QUARANTINE)) == ["a-empty.sr.dcm", "b-text.sr.dcm", "c-half.sr.dcm"]
    assert sum("is damaged" in m and "moved to" in m for m in _lines(caplog)) == 3


def test_pacs_down_then_up_is_delivered_without_a_new_study(bundle, tmp_path, caplog):
    study = make_study(str(tmp_path / "study"), ("T1c",), decoys=False)
    port = free_port()  # nobody listens there yet
    node = _node(bundle, tmp_path / "out", PacsNode("127.0.0.1", port, "PACS"))
    node.start()
    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            send_study(study_files(study), node.port)
            assert wait_until(lambda: node.results, 60)
            wait_until(lambda: False, 1.0)  # several attempts at 0.2 s
            assert len(node.outbox.pending()) == 1
            probe = _associate(node.port, "MODALITY")  # the node keeps answering while the PACS is down
            assert probe.is_established
            probe.release()
            pacs = Pacs(port)  # the PACS comes back; no new study arrives
            try:
                assert wait_until(lambda: pacs.received and not node.outbox.pending(), 20)
            finally:
                pacs.stop()
    finally:
        node.stop()
    assert pacs.received[0].StudyInstanceUID == study["uid"]
    lines = _lines(caplog)
    assert sum("is unreachable" in m for m in lines) == 1  # one line for the outage, not one per attempt
    assert any("reachable again" in m for m in lines) and any("stored at PACS" in m for m in lines)


def test_a_refusing_pacs_is_reported_with_its_status(bundle, tmp_path, caplog):
    study = make_study(str(tmp_path / "study"), ("T1c",), decoys=False)
    ((sr_path, _),) = StudyPipeline(bundle, str(tmp_path / "out"), key="k").run(study["folder"])
    no_sr = Pacs(sop_classes=(MRImageStorage,))
    failing = Pacs(status=0xA700)
    rejecting = Pacs(accept_calling=["SOMEONE_ELSE"])
    try:
        with pytest.raises(PacsError, match=r"refused SOP class Comprehensive SR Storage \(presentation context"):
            send_sr(sr_path, no_sr.node)
        with pytest.raises(PacsError, match=r"refused to store it \(C-STORE status 0xA700\)"):
            send_sr(sr_path, failing.node)
        with pytest.raises(PacsError, match=r"^PACS PACS@127\.0\.0\.1:\d+ rejected the association"):
            send_sr(sr_path, rejecting.node)
        node = _node(bundle, tmp_path / "out2", failing.node)
        node.outbox.put(sr_path)
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            node.start()
            try:
                assert wait_until(lambda: os.path.isdir(tmp_path / "out2" / OUTBOX / REFUSED), 20)
            finally:
                node.stop()
    finally:
        for p in (no_sr, failing, rejecting):
            p.stop()
    assert any("refused to store it (C-STORE status 0xA700)" in m and "moved to" in m for m in _lines(caplog))
    assert not any("unreachable" in m for m in _lines(caplog))
    with pytest.raises(ValueError, match="PACS must be HOST:PORT:AET"):
        PacsNode.parse("localhost:PACS")


def test_aborted_association_and_one_bad_study(bundle, tmp_path, caplog):
    good = make_study(str(tmp_path / "good"), ("T1c",), decoys=False)
    bad = make_study(str(tmp_path / "bad"), ("T1c",), decoys=False)
    for f in bad["series"]["T1c"]:
        ds = pydicom.dcmread(f)
        ds.PixelData = ds.PixelData[:64]  # truncated: the header promises more
        ds.save_as(f)
    pacs = Pacs()
    node = _node(bundle, tmp_path / "out", pacs.node)
    node.start()
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            # an aborted association is not processed: part of a study would give a result from part of it
            send_study(study_files(good)[:2], node.port, release=False)
            send_study(study_files(good) + study_files(bad), node.port)  # one association, two studies
            assert wait_until(lambda: len(node.results) == 2 and pacs.received, 60)
    finally:
        node.stop()
        pacs.stop()
    assert [sr.StudyInstanceUID for sr in pacs.received] == [good["uid"]]
    errors = [r for r in node.results if r[0] == "error"]
    assert len(errors) == 1 and "pixel data holds 64 bytes where its header" in errors[0][1]
    lines = _lines(caplog)
    assert any("association from MODALITY ended without a release: its 2 instance(s) are discarded" in m for m in lines)
    assert any("not processed: series 10 'T1 MPRAGE post Gd'" in m for m in lines)
    assert os.listdir(tmp_path / "out" / "incoming") == []
