"""The MONAI Deploy application (``deploy_app/app.py``, issue #18).

Default run (no SDK): the served TorchScript file answers a DICOM study as the eager network does, through
the same :func:`~cmml_monai.deploy.report.predict_case` the application's inference operator calls.

``pytest -m slow``: the application itself, in a virtual environment of its own (monai-deploy-app-sdk pulls
holoscan, tritonclient and cupy; with cmml-monai's dependencies the venv is about 3.7 GB), run as the SDK's
command line on a study with all sequences (patient attributes holding a PHI marker) and on one with a
sequence missing. Its SR and JSON must equal ``python -m cmml_monai.deploy``'s on the same study, and the
marker must stay in the SR. With ``CMML_EXPLAIN`` (issue #32) it also writes the case page and its Secondary
Capture: the SC is in the study, its pixels are the PNG's (and the CLI's page), the SR references it, and the
marker is in the DICOM files only; Grad-CAM needs the weights beside ``model.ts``, occlusion does not.

The environment is built once under ``$CMML_DEPLOY_VENV_CACHE`` (default ``~/.cache/cmml-monai/deploy-venv``),
in a folder named by a hash of what it installs (``deploy_app/requirements.txt``, cmml-monai's
``install_requires``, the torch pin, the Python version); ``CMML_DEPLOY_VENV=PATH`` uses an existing one.
It holds the SDK and cmml-monai's dependencies, not cmml-monai itself: the application runs this checkout's
code through ``PYTHONPATH``.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.uid import SecondaryCaptureImageStorage

from cmml_monai.data.errors import DataError
from cmml_monai.deploy import load_description, load_network, study_case
from cmml_monai.deploy.export import load_torchscript, resolve_torchscript
from cmml_monai.deploy.package import package_bundle
from cmml_monai.deploy.report import predict_case, read_sr_result
from cmml_monai.deploy.study import load_study
from cmml_monai.evaluation.casepage import PAGE_SIZE, read_page

from pacs_helpers import MARKER, MARKER_DATE, PHI, ROOT, STUDY_ATTRIBUTES, make_study, trained_men_bundle

APP = os.path.join(ROOT, "deploy_app", "app.py")
REQUIREMENTS = os.path.join(ROOT, "deploy_app", "requirements.txt")
#: the CPU wheel this machine keeps on disk; a plain `torch` would pull a CUDA build of several GB
TORCH_PIN = "torch==2.13.0"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    """The tiny MEN run of the PACS tests, packaged as a bundle (``models/model.ts`` included)."""
    run = trained_men_bundle(tmp_path_factory)
    out = str(tmp_path_factory.getbasetemp() / "deploy_app_bundle" / "men_tiny")
    if not os.path.isfile(os.path.join(out, "models", "model.ts")):
        package_bundle(run, out, overwrite=True)
    return out


# -- without the SDK --------------------------------------------------------------------------------------------
def test_torchscript_answers_a_study_as_the_eager_network(bundle, tmp_path):
    ts, ts_desc = load_torchscript(bundle)
    eager = load_network(bundle)
    desc = load_description(bundle)
    assert ts_desc["data"] == desc["data"] and ts_desc["weights_sha256"] == desc["weights_sha256"]
    assert ts_desc["model_dir"] == os.path.join(bundle, "models")
    for sequences, completed in [(("T1c", "T1", "T2", "FLAIR"), []), (("T1c", "T2", "FLAIR"), ["t1n"])]:
        study = make_study(str(tmp_path / "-".join(sequences)), sequences)
        case = study_case(load_study(study["folder"]), desc, "c1")
        got, want = predict_case(ts, ts_desc, case), predict_case(eager, desc, case)
        assert got.probabilities == pytest.approx(want.probabilities, abs=1e-5)
        assert got.prediction == want.prediction
        # the TorchScript module has lost its class: "completed" comes from the description's method
        assert got.completed == want.completed == completed
        assert got.present == want.present


def test_torchscript_bad_paths_name_the_path(bundle, tmp_path):
    assert resolve_torchscript(os.path.join(bundle, "models")) == os.path.join(bundle, "models", "model.ts")
    with pytest.raises(DataError, match=f"{tmp_path}: no TorchScript model"):
        load_torchscript(str(tmp_path))
    bad = tmp_path / "model.ts"
    bad.write_text("not a zip")
    with pytest.raises(DataError, match="not a TorchScript model"):
        load_torchscript(str(bad))
    # a TorchScript file without the description export_torchscript embeds
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(bad))
    with pytest.raises(DataError, match="has no embedded network.json"):
        load_torchscript(str(bad))


# -- the application, in its own virtual environment --------------------------------------------------------------
def _install_requires() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    lines = (line.split("#", 1)[0].strip() for line in cfg["options"]["install_requires"].splitlines())
    return [line for line in lines if line]


def _venv_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def deploy_venv() -> str:
    """The SDK's virtual environment: ``$CMML_DEPLOY_VENV``, or one built (once) under the cache folder and
    keyed by what it installs. A folder left without its ``.complete`` marker (an interrupted build) is
    built again."""
    given = os.environ.get("CMML_DEPLOY_VENV")
    if given:
        if not os.path.isfile(_venv_python(given)):
            raise AssertionError(f"CMML_DEPLOY_VENV={given!r} has no bin/python")
        return given
    with open(REQUIREMENTS, encoding="utf-8") as f:
        # what pip reads: a changed comment does not build another environment
        requirements = "\n".join(line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip())
    deps = _install_requires()
    key = hashlib.sha256(
        b"\0".join(
            [requirements.encode(), "\n".join(deps).encode(), TORCH_PIN.encode(), sys.version.split()[0].encode()]
        )
    ).hexdigest()[:16]
    cache = os.environ.get("CMML_DEPLOY_VENV_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "cmml-monai", "deploy-venv"
    )
    venv = os.path.join(cache, key)
    if os.path.isfile(os.path.join(venv, ".complete")):
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    os.makedirs(cache, exist_ok=True)
    py = _venv_python(venv)
    for cmd in (
        [sys.executable, "-m", "venv", venv],
        [py, "-m", "pip", "install", "-q", TORCH_PIN],
        # torch first, and again here, so that no package of the SDK pulls another build
        [py, "-m", "pip", "install", "-q", TORCH_PIN, "-r", REQUIREMENTS, *deps],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise AssertionError(f"building the SDK's environment failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    with open(os.path.join(venv, ".complete"), "w") as f:
        f.write("\n".join([TORCH_PIN, *deps]) + "\n")
    return venv


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    # the SDK's own settings of a MAP container would override -i/-o/-m: none here
    for name in ("HOLOSCAN_INPUT_PATH", "HOLOSCAN_OUTPUT_PATH", "HOLOSCAN_MODEL_PATH"):
        env.pop(name, None)
    return env


def run_app(venv: str, study: str, out: str, model: str, cwd: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_venv_python(venv), APP, "-i", study, "-o", out, "-m", model],
        cwd=cwd,
        env=_env(CMML_PSEUDONYM_KEY="k", CMML_DEVICE="cpu", CMML_VERBOSE="1", **extra),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_app_in_its_own_venv_matches_the_cli(bundle, tmp_path):
    start = time.monotonic()
    venv = deploy_venv()
    print(f"SDK environment {venv}: {time.monotonic() - start:.0f} s")
    full = make_study(str(tmp_path / "full"), ("T1c", "T1", "T2", "FLAIR"), patient=PHI)
    missing = make_study(str(tmp_path / "missing"), ("T1c", "T2", "FLAIR"))
    logs = {}
    # the bundle folder, and the model.ts alone (the SDK's single-model convention)
    runs = [("full", full, bundle), ("missing", missing, os.path.join(bundle, "models", "model.ts"))]
    for name, study, model in runs:
        out_app, out_cli = tmp_path / f"app_{name}", tmp_path / f"cli_{name}"
        t0 = time.monotonic()
        proc = run_app(venv, study["folder"], str(out_app), model, str(tmp_path))
        print(f"app on the {name} study: {time.monotonic() - t0:.1f} s")
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[name] = proc.stdout + proc.stderr
        # the SDK's executor ran the operators' graph
        assert "Graph execution finished" in logs[name] and "1 study(ies) under the input folder" in logs[name]
        assert "t1c <- series 10" in logs[name]  # every log line on (CMML_VERBOSE) for the PHI check below
        cli = subprocess.run(
            [sys.executable, "-m", "cmml_monai.deploy", study["folder"], "--bundle", bundle, "--out", str(out_cli)],
            env=_env(CMML_PSEUDONYM_KEY="k"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert cli.returncode == 0, cli.stderr[-3000:]
        # the same case name (the keyed hash of the StudyInstanceUID), an SR and a JSON each
        assert sorted(os.listdir(out_app)) == sorted(os.listdir(out_cli))
        (sr_name,) = [f for f in os.listdir(out_app) if f.endswith(".sr.dcm")]
        app_sr, cli_sr = pydicom.dcmread(out_app / sr_name), pydicom.dcmread(out_cli / sr_name)
        got, want = read_sr_result(app_sr), read_sr_result(cli_sr)
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
        assert {k: v for k, v in got.items() if k != "probabilities"} == {
            k: v for k, v in want.items() if k != "probabilities"
        }
        assert got["completed"] == ([] if name == "full" else ["t1n"])
        assert app_sr.StudyInstanceUID == study["uid"] and app_sr.ContentQualification == "RESEARCH"
        assert app_sr.PatientID == cli_sr.PatientID == (MARKER if name == "full" else "TP001")
        json_name = sr_name[: -len(".sr.dcm")] + ".json"
        app_json, cli_json = (json.loads((d / json_name).read_text()) for d in (out_app, out_cli))
        assert app_json["probabilities"] == pytest.approx(cli_json["probabilities"], abs=1e-5)
        drop = ("probabilities", "sr_sop_instance_uid")
        assert {k: v for k, v in app_json.items() if k not in drop} == {
            k: v for k, v in cli_json.items() if k not in drop
        }
        assert app_json["sr_sop_instance_uid"] == str(app_sr.SOPInstanceUID)
        # the marker (and the birth date) in the SR only: not in the JSON, nor in the app's logs
        for path in out_app.iterdir():
            data = path.read_bytes()
            assert (MARKER.encode() in data or MARKER_DATE.encode() in data) == (
                name == "full" and path.name.endswith(".sr.dcm")
            )
    for name, text in logs.items():
        assert MARKER not in text and MARKER_DATE not in text, name
    # bad input: exit status 2, the last line names the folder, nothing written
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no dicom here")
    proc = run_app(venv, str(tmp_path / "empty"), str(tmp_path / "app_bad"), bundle, str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no DICOM image file found" in last and str(tmp_path / "empty") in last
    assert not (tmp_path / "app_bad").exists() or os.listdir(tmp_path / "app_bad") == []
    # a model folder without model.ts: refused while the graph is built, before any study is read
    proc = run_app(venv, full["folder"], str(tmp_path / "app_bad"), str(tmp_path / "empty"), str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{tmp_path / 'empty'}: no TorchScript model" in last
    assert os.listdir(tmp_path / "app_bad") == []
    print(f"total {time.monotonic() - start:.0f} s")


def _check_page_and_sc(out, study_uid: str) -> tuple[str, pydicom.Dataset]:
    """The case's PNG and SC in ``out``: the SC in the study, its pixels the PNG's, referenced from the SR."""
    (sr_name,) = [f for f in os.listdir(out) if f.endswith(".sr.dcm")]
    stem = sr_name[: -len(".sr.dcm")]
    assert sorted(os.listdir(out)) == sorted(f"{stem}{ext}" for ext in (".sr.dcm", ".json", ".png", ".sc.dcm")) + [
        "index.html"
    ]
    sr, sc = pydicom.dcmread(out / sr_name), pydicom.dcmread(out / f"{stem}.sc.dcm")
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.StudyInstanceUID == sr.StudyInstanceUID == study_uid
    assert sc.SeriesInstanceUID != sr.SeriesInstanceUID and sc.BurnedInAnnotation == "YES"
    assert "RESEARCH USE ONLY" in sc.ImageComments
    png = str(out / f"{stem}.png")
    with Image.open(png) as im:
        assert im.size == PAGE_SIZE and not getattr(im, "text", {})
    assert np.array_equal(sc.pixel_array, read_page(png))
    refs = [item for item in sr.ContentSequence if item.ValueType == "IMAGE"]
    assert [r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in refs] == [sc.SOPInstanceUID]
    assert f'href="{stem}.png"' in (out / "index.html").read_text(encoding="utf-8")
    return png, sc


@pytest.mark.slow
def test_app_explain_writes_the_page_and_its_sc(bundle, tmp_path):
    venv = deploy_venv()
    study = make_study(str(tmp_path / "full"), ("T1c", "T1", "T2", "FLAIR"), patient=PHI)
    out_app, out_cli = tmp_path / "app", tmp_path / "cli"
    t0 = time.monotonic()
    proc = run_app(venv, study["folder"], str(out_app), bundle, str(tmp_path), CMML_EXPLAIN="1")
    print(f"app with CMML_EXPLAIN=1: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "case pages: gradcam" in log and "case page (Grad-CAM maps)" in log
    print([line for line in log.splitlines() if "case page and SC in" in line])
    png, sc = _check_page_and_sc(out_app, study["uid"])
    # the marker sits only in the SC's attributes copied from the study, and in the SR: not in the PNG, the
    # JSON, the index, nor the logs
    with_marker = {e.keyword for e in sc.iterall() if MARKER in str(e.value) or MARKER_DATE in str(e.value)}
    assert with_marker and with_marker <= STUDY_ATTRIBUTES, with_marker
    for path in out_app.iterdir():
        data = path.read_bytes()
        assert (MARKER.encode() in data or MARKER_DATE.encode() in data) == path.name.endswith(".dcm"), path.name
    assert MARKER not in log and MARKER_DATE not in log
    # the same page as python -m cmml_monai.deploy --explain: the same eager network, maps and drawing
    cli = subprocess.run(
        [sys.executable, "-m", "cmml_monai.deploy", study["folder"], "--bundle", bundle, "--out", str(out_cli)]
        + ["--explain"],
        env=_env(CMML_PSEUDONYM_KEY="k"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert np.array_equal(read_page(png), read_page(str(out_cli / os.path.basename(png))))
    # model.ts alone: no weights for Grad-CAM's eager network, refused while the graph is built ...
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(os.path.join(bundle, "models", "model.ts"), lone / "model.ts")
    proc = run_app(venv, study["folder"], str(tmp_path / "app_bad"), str(lone), str(tmp_path), CMML_EXPLAIN="1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{lone}: no model.pt beside model.ts" in last and "occlusion" in last
    assert not (tmp_path / "app_bad").exists() or os.listdir(tmp_path / "app_bad") == []
    # ... while occlusion explains the TorchScript module itself
    missing = make_study(str(tmp_path / "missing"), ("T1c", "T2", "FLAIR"))
    proc = run_app(
        venv, missing["folder"], str(tmp_path / "app_occ"), str(lone), str(tmp_path), CMML_EXPLAIN="occlusion"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "case page (occlusion maps)" in log
    print([line for line in log.splitlines() if "case page and SC in" in line])
    _check_page_and_sc(tmp_path / "app_occ", missing["uid"])
