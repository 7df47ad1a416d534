"""``python -m cmml_monai.deploy`` (study folder and listener) end to end, and the PHI test: a marker in every
patient attribute of the input is found in the SR only, never in logs or JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pydicom
import pytest

from cmml_monai.deploy.__main__ import main
from cmml_monai.deploy.listener import OUTBOX
from cmml_monai.deploy.report import read_sr_result
from cmml_monai.deploy.study import pseudonym

from pacs_helpers import (
    MARKER,
    MARKER_DATE,
    PHI,
    ROOT,
    Pacs,
    free_port,
    make_study,
    send_study,
    study_files,
    trained_men_bundle,
    wait_for_scp,
)

# the README's "PACS" commands end to end (one subprocess each where the entry point itself is tested)
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return trained_men_bundle(tmp_path_factory)


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    return env


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cmml_monai.deploy", *args], env=_env(**env), capture_output=True, text=True, timeout=300
    )


def test_cli_writes_sr_and_json_for_full_and_missing_studies(bundle, tmp_path):
    """One run of the command on a folder of two studies (--each-study): the full one and one without T1."""
    out = tmp_path / "out"
    studies = {"full": ("T1c", "T1", "T2", "FLAIR"), "missing": ("T1c", "T2", "FLAIR")}
    made = {name: make_study(str(tmp_path / "in" / name), seq) for name, seq in studies.items()}
    proc = cli(str(tmp_path / "in"), "--each-study", "--bundle", bundle, "--out", str(out), CMML_PSEUDONYM_KEY="k")
    assert proc.returncode == 0, proc.stderr
    written = proc.stdout.split()
    assert len(written) == 4 and all(os.path.isfile(p) for p in written)
    by_study = {pydicom.dcmread(p).StudyInstanceUID: p for p in written if p.endswith(".sr.dcm")}
    for name, sequences in studies.items():
        study = made[name]
        sr_path = by_study[study["uid"]]
        case = os.path.basename(sr_path)[: -len(".sr.dcm")]
        assert case == pseudonym(study["uid"], "k")  # named by the keyed hash, not by a patient attribute
        record = json.load(open(out / f"{case}.json"))
        sr = pydicom.dcmread(sr_path)
        got = read_sr_result(sr)
        assert sr.ContentQualification == "RESEARCH" and sr.PatientID == "TP001"
        assert record["research_use_only"] is True and record["case_id"] == case
        assert got["probabilities"] == pytest.approx(record["probabilities"], abs=1e-9)
        assert (
            got["prediction"] == record["prediction"] == [max(record["probabilities"], key=record["probabilities"].get)]
        )
        assert got["model_name"] == record["model"]["name"] and got["model_version"] == record["model"]["version"]
        assert record["model"]["version"].startswith("0.1.0 (weights ")
        expected_present = ["t1c", "t1n", "t2w", "t2f"] if name == "full" else ["t1c", "t2w", "t2f"]
        assert record["present"] == [*expected_present, "table"] == list(got["present"])
        assert record["completed"] == got["completed"] == ([] if name == "full" else ["t1n"])
        assert record["series"]["t1c"] == {"number": 10, "description": "T1 MPRAGE post Gd", "files": 4}
        # the evidence is exactly the instances of the series used
        refs = {
            r.ReferencedSOPInstanceUID
            for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
            for r in s.ReferencedSOPSequence
        }
        used = {pydicom.dcmread(f).SOPInstanceUID for s in sequences for f in study["series"][s]}
        assert refs == used


def test_cli_bad_input_is_one_error_line(bundle, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no dicom here")
    make_study(str(tmp_path / "two" / "a"), ("T1c",), decoys=False)
    make_study(str(tmp_path / "two" / "b"), ("T2",), decoys=False)
    out = tmp_path / "out"
    for args, message in [
        ([str(tmp_path / "empty")], "no DICOM image file found"),
        ([str(tmp_path / "two")], "holds 2 studies (4 files, 4 files) where one was expected"),
        ([str(tmp_path / "two"), "--each-study", "--case-id", "x"], "--case-id names one case"),
        ([str(tmp_path / "two" / "a"), "--case-id", "../x"], "--case-id '../x'"),
        ([str(tmp_path / "two" / "a"), "--rules", str(tmp_path / "nope.json")], "series rules"),
    ]:
        assert main([*args, "--bundle", bundle, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    for args, message in [
        (["--pacs", "nonsense"], "--pacs: PACS must be HOST:PORT:AET, got 'nonsense'"),
        (["--allow-any", "--ae-title", "A_TITLE_OF_20_CHARS"], "listen: AE title must be 1-16 printable"),
        ([], "listen: say who may send: --allow AET (repeat it) or --allow-file FILE"),
        (["--allow", "A_TITLE_OF_20_CHARS"], "allowlist: allowed AE title must be 1-16"),
        (["--allow-file", str(tmp_path / "none.json")], "allowlist "),
        (["--allow", "M", "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", "k"], "TLS certificate "),
        (["--allow", "M", "--tls-cert", str(tmp_path / "c.pem")], "TLS needs both"),
    ]:
        assert main(["listen", "--bundle", bundle, "--out", str(out), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists() or os.listdir(out) == []  # nothing half-written
    # the installed entry point prints the same one line
    proc = cli(str(tmp_path / "empty"), "--bundle", bundle, "--out", str(out))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr


def test_phi_marker_only_in_the_sr(bundle, tmp_path):
    study = make_study(str(tmp_path / "study"), ("T1c", "T2"), patient=PHI)
    assert MARKER in str(pydicom.dcmread(study["series"]["T1c"][0]).PatientName)
    # 1. the study folder command, every log line on
    out_cli = tmp_path / "out_cli"
    proc = cli(study["folder"], "--bundle", bundle, "--out", str(out_cli), "--verbose", CMML_PSEUDONYM_KEY="k")
    assert proc.returncode == 0, proc.stderr
    logs = {"cli stdout": proc.stdout, "cli stderr": proc.stderr}
    # 2. the listener command, receiving the study and sending the SR to a PACS
    out_net = tmp_path / "out_net"
    pacs = Pacs()
    port = free_port()
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cmml_monai.deploy",
            "listen",
            "--bundle",
            bundle,
            "--out",
            str(out_net),
            "--port",
            str(port),
            "--allow",
            "MODALITY",
            "--stable-age",
            "1",
            "--retry-interval",
            "0.5",
            "--pacs",
            f"127.0.0.1:{pacs.node.port}:PACS",
            "--verbose",
        ],
        env=_env(CMML_PSEUDONYM_KEY="k"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_scp(port)
        send_study(study_files(study), port)
        end = time.monotonic() + 120
        while not pacs.received and time.monotonic() < end and listener.poll() is None:
            time.sleep(0.2)
        # the listener logs "stored at PACS" after the PACS answered and the SR left its outbox: wait for that
        outbox = out_net / OUTBOX
        while any(outbox.glob("*.dcm")) and time.monotonic() < end and listener.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        listener.terminate()  # the process this test started, by its handle
        stdout, stderr = listener.communicate(timeout=60)
        pacs.stop()
    logs["listener"] = stdout + stderr
    (received,) = pacs.received
    assert "SR" in received.Modality and MARKER in str(received.PatientName)
    assert "stored at PACS" in logs["listener"] and "t1c <- series 10" in logs["cli stderr"]  # the logs were on
    # every output file: the marker (and the birth date) in the SR files only
    files = [os.path.join(d, f) for root in (out_cli, out_net) for d, _, fs in os.walk(root) for f in fs]
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".sr.dcm") for f in files)
    for path in files:
        data = open(path, "rb").read()
        found = MARKER.encode() in data or MARKER_DATE.encode() in data
        assert found == path.endswith(".sr.dcm"), path
    for name, text in logs.items():
        assert MARKER not in text and MARKER_DATE not in text, name
