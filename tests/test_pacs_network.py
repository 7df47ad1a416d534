"""The DICOM listener (cmml_monai.deploy.listener) between a sending modality and a PACS, all pynetdicom on
127.0.0.1: a study goes in by C-STORE, the SR comes out at the PACS."""

from __future__ import annotations

import logging
import os

import pydicom
import pytest
from pynetdicom.sop_class import ComprehensiveSRStorage

from cmml_monai.deploy.listener import OUTBOX, Listener, PacsError, PacsNode, send_sr
from cmml_monai.deploy.pipeline import StudyPipeline
from cmml_monai.deploy.report import read_sr_result

from pacs_helpers import Pacs, free_port, make_study, send_study, study_files, trained_men_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return trained_men_bundle(tmp_path_factory)


def test_listener_receives_a_study_and_the_pacs_receives_its_sr(bundle, tmp_path):
    study = make_study(str(tmp_path / "study"), ("T1c", "T2"))
    pacs = Pacs()
    node = Listener(StudyPipeline(bundle, str(tmp_path / "out"), key="k"), pacs.node, port=0, retry_delay=0.05)
    node.start()
    try:
        send_study(study_files(study), node.port)
        assert node.processed.wait(60)
    finally:
        node.stop()
        pacs.stop()
    (sr,) = pacs.received
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    assert sr.StudyInstanceUID == study["uid"] and sr.PatientID == "TP001"  # filed with the study
    refs = {r.ReferencedSOPInstanceUID: s.SeriesInstanceUID
            for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence}
    used = {pydicom.dcmread(f).SOPInstanceUID for name in ("T1c", "T2") for f in study["series"][name]}
    assert set(refs) == used  # every instance of the series used, nothing of the localizer or derived
    got = read_sr_result(sr)
    t1c = pydicom.dcmread(study["series"]["T1c"][0]).SeriesInstanceUID
    assert got["present"]["t1c"] == t1c and sorted(got["present"]) == ["t1c", "t2w", "table"]
    assert got["completed"] == ["t1n", "t2f"] and got["comment"].startswith("RESEARCH USE ONLY")
    probs = got["probabilities"]
    assert set(probs) == {"low", "high"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert got["prediction"] == [max(probs, key=probs.get)]
    # the SR left the outbox once stored; the received images (PHI) are gone
    assert os.listdir(tmp_path / "out" / OUTBOX) == [] and os.listdir(tmp_path / "out" / "incoming") == []
    assert node.results[0][0].endswith(".sr.dcm") and os.path.isfile(node.results[0][0])


def test_unreachable_pacs_keeps_the_sr_and_sends_it_later(bundle, tmp_path, caplog):
    study = make_study(str(tmp_path / "study"), ("T1c",), decoys=False)
    port = free_port()  # nobody listens there yet
    node = Listener(StudyPipeline(bundle, str(tmp_path / "out"), key="k"), PacsNode("127.0.0.1", port, "PACS"),
                    port=0, retries=2, retry_delay=0.05)
    node.start()
    try:
        with caplog.at_level(logging.INFO, logger="cmml_monai.deploy.listener"):
            send_study(study_files(study), node.port)
            assert node.processed.wait(60)
        lines = [r.getMessage() for r in caplog.records if r.name == "cmml_monai.deploy.listener"]
        assert any("(attempt 1/2)" in m and "is unreachable" in m and "retrying in 0.05 s" in m for m in lines)
        assert any("(attempt 2/2)" in m and "kept in" in m for m in lines)
        (waiting,) = os.listdir(tmp_path / "out" / OUTBOX)
        pacs = Pacs(port)  # the PACS comes back
        try:
            assert node.flush_outbox() == 0
        finally:
            pacs.stop()
    finally:
        node.stop()
    (sr,) = pacs.received
    assert sr.StudyInstanceUID == study["uid"] and waiting.endswith(".sr.dcm")
    assert os.listdir(tmp_path / "out" / OUTBOX) == []


def test_refused_association_and_aborted_study(bundle, tmp_path, caplog):
    pacs = Pacs(accept_calling=["SOMEONE_ELSE"])
    study = make_study(str(tmp_path / "study"), ("T1c",), decoys=False)
    out = tmp_path / "out"
    pipeline = StudyPipeline(bundle, str(out), key="k")
    (sr_path, _), = pipeline.run(study["folder"])
    try:
        with pytest.raises(PacsError, match=r"^PACS PACS@127\.0\.0\.1:\d+ rejected the association"):
            send_sr(sr_path, pacs.node, "CMML")
    finally:
        pacs.stop()
    # an aborted association is not processed: part of a study would give a result from part of the images
    node = Listener(pipeline, None, port=0)
    node.start()
    try:
        with caplog.at_level(logging.WARNING, logger="cmml_monai.deploy.listener"):
            send_study(study_files(study)[:2], node.port, release=False)
            for _ in range(100):
                if any("aborted" in r.getMessage() for r in caplog.records):
                    break
                node.processed.wait(0.05)
    finally:
        node.stop()
    assert any("association from MODALITY aborted: its 2 instance(s) are discarded" in r.getMessage()
               for r in caplog.records)
    assert not node.results and os.listdir(out / "incoming") == []
    with pytest.raises(ValueError, match="PACS must be HOST:PORT:AET"):
        PacsNode.parse("localhost:PACS")
    assert PacsNode.parse("10.0.0.1:104:ORTHANC") == PacsNode("10.0.0.1", 104, "ORTHANC")


def test_one_bad_study_does_not_cost_the_other(bundle, tmp_path, caplog):
    good = make_study(str(tmp_path / "good"), ("T1c",), decoys=False)
    bad = make_study(str(tmp_path / "bad"), ("T1c",), decoys=False)
    for f in bad["series"]["T1c"]:
        ds = pydicom.dcmread(f)
        del ds.PixelData
        ds.save_as(f)
    pacs = Pacs()
    node = Listener(StudyPipeline(bundle, str(tmp_path / "out"), key="k"), pacs.node, port=0)
    node.start()
    try:
        with caplog.at_level(logging.ERROR, logger="cmml_monai.deploy.listener"):
            send_study(study_files(good) + study_files(bad), node.port)  # one association, two studies
            assert node.processed.wait(60)
    finally:
        node.stop()
        pacs.stop()
    assert [sr.StudyInstanceUID for sr in pacs.received] == [good["uid"]]
    errors = [r for r in node.results if r[0] == "error"]
    assert len(errors) == 1 and "has a file without pixel data" in errors[0][1]
    assert any("not processed: series 10 'T1 MPRAGE post Gd'" in r.getMessage() for r in caplog.records)
