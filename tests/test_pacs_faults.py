"""kill -9 of a real listener process (``python -m cmml_monai.deploy listen``) at three points, then a
restart: every study it acknowledged is answered by exactly one SR at the PACS, partial transfers are
removed (logged, counted), no patient data is left on disk. Senders and the PACS are pynetdicom on
127.0.0.1; each wait is bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from pacs_helpers import (
    ROOT,
    Pacs,
    free_port,
    make_study,
    send_study,
    study_files,
    trained_men_bundle,
    wait_for_scp,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return trained_men_bundle(tmp_path_factory)


class Node:
    """The listener as its own process (the one this test starts and kills, by its handle)."""

    def __init__(self, bundle: str, out: str, pacs_port: int, log: str, stable_age: float = 1.0) -> None:
        self.port = free_port()
        self.log_path = log
        env = dict(os.environ, PYTHONUNBUFFERED="1", CMML_PSEUDONYM_KEY="k", OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
        self.log = open(log, "a")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cmml_monai.deploy",
                "listen",
                "--bundle",
                bundle,
                "--out",
                out,
                "--port",
                str(self.port),
                "--allow",
                "MODALITY",
                "--allow",
                "PROBE",
                "--stable-age",
                str(stable_age),
                "--retry-interval",
                "0.5",
                "--pacs",
                f"127.0.0.1:{pacs_port}:PACS",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for_scp(self.port)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
        self.log.close()
        return open(self.log_path).read()


def _no_patient_data_left(out) -> None:
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(out / "incoming") for f in fs]
    assert leftovers == [], leftovers
    assert [f for f in os.listdir(out / "outbox") if f.endswith(".dcm")] == []
    assert not [f for d, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]


def test_kill_during_receive_then_restart(bundle, tmp_path):
    study = make_study(str(tmp_path / "study"), ("T1c", "T2"), decoys=False)
    files, out, log = study_files(study), tmp_path / "out", str(tmp_path / "listener.log")
    pacs = Pacs()
    node = Node(bundle, str(out), pacs.node.port, log)
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CMML")
        for f in files[:5]:  # acknowledged one by one, the association still open
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
        node.kill()
        assoc.abort()
        parts = [f for d, _, fs in os.walk(out / "incoming") for f in fs]
        assert len(parts) == 5  # on disk before each success
        node = Node(bundle, str(out), pacs.node.port, log)
        send_study(files, node.port)  # the sender was told the transfer failed: it sends again
        assert wait_until(lambda: pacs.received and not os.listdir(out / "outbox"), 90)
        wait_until(lambda: False, 2.0)
    finally:
        text = node.stop()
        pacs.stop()
    assert pacs.by_study() == {study["uid"]: {pacs.received[0].SOPInstanceUID}}
    assert "5 partial instance(s) of unfinished associations removed (1 study folder(s))" in text
    _no_patient_data_left(out)


def test_kill_after_release_then_restart(bundle, tmp_path):
    studies = [make_study(str(tmp_path / f"s{i}"), ("T1c",), decoys=False) for i in range(2)]
    out, log = tmp_path / "out", str(tmp_path / "listener.log")
    pacs = Pacs()
    node = Node(bundle, str(out), pacs.node.port, log, stable_age=5.0)
    try:
        for s in studies:
            send_study(study_files(s), node.port)  # released: acknowledged, not yet quiet for 5 s
        node.kill()
        assert not pacs.received
        node = Node(bundle, str(out), pacs.node.port, log, stable_age=1.0)
        assert wait_until(lambda: len(pacs.received) == 2 and not os.listdir(out / "outbox"), 90)
        wait_until(lambda: False, 2.0)
    finally:
        text = node.stop()
        pacs.stop()
    assert {uid: len(sops) for uid, sops in pacs.by_study().items()} == {s["uid"]: 1 for s in studies}
    assert "restart: 2 complete study(ies) resumed" in text
    _no_patient_data_left(out)


def test_kill_during_send_then_restart(bundle, tmp_path):
    study = make_study(str(tmp_path / "study"), ("T1c",), decoys=False)
    out, log = tmp_path / "out", str(tmp_path / "listener.log")
    pacs = Pacs(delay=3.0)  # a slow PACS: the listener is killed while its C-STORE is under way
    node = Node(bundle, str(out), pacs.node.port, log)
    try:
        send_study(study_files(study), node.port)
        assert pacs.entered.wait(90)
        node.kill()
        assert [f for f in os.listdir(out / "outbox") if f.endswith(".sr.dcm")]  # not stored: still waiting
        pacs.delay = 0.0
        node = Node(bundle, str(out), pacs.node.port, log)
        assert wait_until(lambda: not [f for f in os.listdir(out / "outbox") if f.endswith(".dcm")], 60)
        wait_until(lambda: False, 2.0)
    finally:
        node.stop()
        pacs.stop()
    # sent again after the restart: the same SR instance, so the PACS holds exactly one SR for the study
    assert len(pacs.received) >= 1
    assert {uid: len(sops) for uid, sops in pacs.by_study().items()} == {study["uid"]: 1}
    _no_patient_data_left(out)
