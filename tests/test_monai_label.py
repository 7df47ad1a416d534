"""MONAI Label 0.8.5 serves a packaged bundle as a classification bundle (issue #17); opt-in: ``pytest -m slow``.

monailabel pins numpy below 2 and pulls torchvision, so it gets a virtual environment of its own
(``CMML_LABEL_VENV``, default ``/tmp/venv_label``; built on first use, about 5 minutes, then reused):
the CPU torch 2.13.0, ``monailabel==0.8.5`` (torch and torchvision held by a constraints file, so pip never
swaps in a CUDA torch), then this package. PyPI's torchvision is a CUDA build whose ops library does not
load beside the CPU torch ("operator torchvision::nms does not exist"), and monailabel imports
``torchvision.utils`` at module level only for segmentation overlays; the venv therefore replaces it by a
stand-in whose two functions raise. Everything else is the real monailabel.

A tiny run (synthetic Derm7pt, 32 px, 1 + 1 epochs) is packaged; inside the venv
``BundleInferTask(bundle, type="classification", add_post_restore=False)`` answers one image-only request
(a dermoscopy JPEG); its class names and probabilities must equal the packaged ``configs/inference.json``
run on the same case (a manifest row with only that image).

Issue #32: MONAI Label's infer protocol carries a result file beside the JSON, so
:class:`~cmml_monai.deploy.label_task.CasePageInferTask` answers with the case page's PNG: same scores as the
plain task, the page's probabilities equal to them, the page identical whatever the image file is called (the
file name, often a patient or accession number in a datastore, never reaches it), no text chunk in the PNG.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cmml_monai.evaluation.casepage import PAGE_SIZE, read_page

from bundle_helpers import train_tiny_derm7pt
from pacs_helpers import MARKER as PHI_MARKER

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "package_bundle.py")
VENV = os.environ.get("CMML_LABEL_VENV", "/tmp/venv_label")
MARKER = os.path.join(VENV, "cmml-label-ready.json")
# torchvision 0.28.0 is torch 2.13.0's release: held so that pip does not reach for a torch that needs CUDA
CONSTRAINTS = "torch==2.13.0\ntorchvision==0.28.0\nnumpy<2\n"
STUB = {
    "__init__.py": '"""Stand-in: PyPI\'s torchvision is a CUDA build that cannot load beside the CPU torch."""\n'
    '__version__ = "0.0.0+stub"\n',
    "utils.py": "def _unavailable(*args, **kwargs):\n"
    "    raise RuntimeError('torchvision is a stand-in in this venv (no CPU build on PyPI)')\n\n\n"
    "make_grid = save_image = _unavailable\n",
}
CHECK = """
import json, sys
from monailabel.tasks.infer.bundle import BundleInferTask
bundle, image, modality = sys.argv[1:4]
task = BundleInferTask(bundle, conf={}, type="classification", add_post_restore=False)
assert task.is_valid(), "BundleInferTask did not accept the bundle"
label, result = task({"image": image, "modality": modality, "device": "cpu"})
print("RESULT " + json.dumps({"label": label, "type": str(task.type), "labels": task.labels,
                              "prediction": result["prediction"]}))
"""


def _venv_python() -> str:
    return os.path.join(VENV, "bin", "python")


def _pip(*args: str) -> None:
    done = subprocess.run(
        [_venv_python(), "-m", "pip", "install", "-q", *args], capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, f"pip install {args}: {done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def label_venv(tmp_path_factory) -> str:
    """The venv's python, built once (the marker records what it holds)."""
    if not os.path.isfile(MARKER):
        start = time.time()
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True, timeout=300)
        constraints = tmp_path_factory.mktemp("label_venv") / "constraints.txt"
        constraints.write_text(CONSTRAINTS)
        _pip("torch==2.13.0")  # the CPU wheel (README); a plain 'torch' would be a CUDA build
        _pip("-c", str(constraints), "monailabel==0.8.5")
        _pip("-c", str(constraints), "-e", ROOT)
        subprocess.run([_venv_python(), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=True, timeout=300)
        purelib = subprocess.run(
            [_venv_python(), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        os.makedirs(os.path.join(purelib, "torchvision"), exist_ok=True)
        for name, text in STUB.items():
            with open(os.path.join(purelib, "torchvision", name), "w", encoding="utf-8") as f:
                f.write(text)
        with open(MARKER, "w", encoding="utf-8") as f:
            json.dump({"built_s": round(time.time() - start), "constraints": CONSTRAINTS}, f)
    return _venv_python()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("label")
    data, run, w = train_tiny_derm7pt(root)
    w.finalize()
    out = str(root / "bundle" / "derm7pt_tiny")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, SCRIPT, run, "--out", out], cwd=str(root), env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    image = sorted(os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs if f.endswith(".jpg"))[0]
    return {"root": root, "bundle": out, "image": image}


def _inference_json(bundle: dict, image: str) -> dict[str, float]:
    """The packaged inference.json on one image-only manifest row: class -> probability."""
    work = bundle["root"] / "predict"
    work.mkdir(exist_ok=True)
    manifest = work / "cases.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "clinic", "derm", "elevation", "location", "sex"])
        writer.writerow(["q1", "", image, "", "", ""])
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            os.path.join(bundle["bundle"], "configs", "inference.json"),
            "--bundle_root",
            bundle["bundle"],
            "--dataset_name",
            "manifest",
            "--dataset_dir",
            str(manifest),
            "--progress_bar",
            "false",
        ],
        cwd=str(work),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(work / "predictions" / "predictions.csv", newline="", encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f))
    assert row["present"] == "derm" and row["completed"] == "clinic;table"
    return {k[len("prob_") :]: float(v) for k, v in row.items() if k.startswith("prob_")}


def test_monai_label_bundle_infer_task_answers_an_image_only_request(label_venv, bundle, tmp_path):
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    # PYTHONPATH: this checkout's cmml_monai, whatever checkout the reused venv was built from
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    start = time.time()
    done = subprocess.run(
        [label_venv, str(script), bundle["bundle"], bundle["image"], "derm"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT ") :])
    print(f"monailabel request: {time.time() - start:.1f} s")
    assert result["type"] == "classification" and result["label"] is None  # no label file: a classification
    assert result["labels"] == {"bcc": 0, "nev": 1, "mel": 2, "misc": 3, "sk": 4}
    label_probs = {p["label"]: p["score"] for p in result["prediction"]}
    ours = _inference_json(bundle, bundle["image"])
    assert set(label_probs) == {c.lower() for c in ours}
    for name, prob in ours.items():
        assert label_probs[name.lower()] == pytest.approx(prob, abs=1e-5)
    assert abs(sum(label_probs.values()) - 1.0) < 1e-5


PAGE_CHECK = """
import json, sys, time
from cmml_monai.deploy.label_task import CasePageInferTask
bundle, modality, *images = sys.argv[1:]
task = CasePageInferTask(bundle)
assert task.is_valid(), "BundleInferTask did not accept the bundle"
for image in images:
    start = time.perf_counter()
    png, result = task({"image": image, "modality": modality, "device": "cpu"})
    print("PAGE " + json.dumps({"png": png, "result": result, "seconds": time.perf_counter() - start}))
png, result = task({"image": images[0], "modality": modality, "device": "cpu", "case_page": False})
print("NOPAGE " + json.dumps({"png": png, "keys": sorted(result)}))
"""


def test_monai_label_answers_with_the_case_page(label_venv, bundle, tmp_path):
    script = tmp_path / "check_page.py"
    script.write_text(PAGE_CHECK)
    # the same image under a plain name and under a name holding the PHI marker
    plain, marked = tmp_path / "image.jpg", tmp_path / f"{PHI_MARKER}.jpg"
    for path in (plain, marked):
        path.write_bytes(open(bundle["image"], "rb").read())
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [label_venv, str(script), bundle["bundle"], "derm", str(plain), str(marked)],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    answers = [json.loads(x[len("PAGE ") :]) for x in done.stdout.splitlines() if x.startswith("PAGE ")]
    print("page per request (s):", [round(a["seconds"], 2) for a in answers])
    ours = _inference_json(bundle, bundle["image"])
    pages = []
    for answer in answers:
        result = answer["result"]
        scores = {p["label"]: p["score"] for p in result["prediction"]}
        for name, prob in ours.items():
            assert scores[name.lower()] == pytest.approx(prob, abs=1e-5)
        assert result["case_page"]["maps"] == "Grad-CAM" and result["case_page"]["research_use_only"] is True
        assert result["case_page"]["explained_class"].lower() == max(scores, key=scores.get)
        assert result["case_page"]["completed"] == ["clinic", "table"]
        assert PHI_MARKER not in json.dumps(result)
        with Image.open(answer["png"]) as im:
            assert im.size == PAGE_SIZE and im.format == "PNG" and not getattr(im, "text", {})
        pages.append(read_page(answer["png"]))
        os.remove(answer["png"])  # a temporary file, as the server deletes it once sent
    # the file name does not reach the page: the two requests draw the same pixels
    assert len(pages) == 2 and np.array_equal(pages[0], pages[1])
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("NOPAGE ")]
    nopage = json.loads(line[len("NOPAGE ") :])
    assert nopage["png"] is None and "case_page" not in nopage["keys"] and "prediction" in nopage["keys"]
