"""The commands of README.md, docs/datasets.md and docs/evaluation.md end to end, as a user types them.

Each test runs the command line at tiny sizes (seconds each) in a subprocess from a fresh working
directory on synthetic data written by ``scripts/make_synthetic.py``: the ODIR-5K overlay (multi-label) followed by
``configs/evaluate.json`` on the trained model, the MEN overlay (3D, DICOM series), and
``scripts/compare.py`` training two methods with two seeds. The default job itself is the CI's main
job (``.ci/run``), so it is not repeated here.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bundle_helpers import TINY_ARGS as TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.json")
EVALUATE = os.path.join(ROOT, "configs", "evaluate.json")
RATES = [0.0, 0.1, 0.3, 0.5, 0.7]

pytestmark = pytest.mark.e2e


def _env() -> dict:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run(args: list[str], cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=str(cwd), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{args[:4]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _bundle(configs: list[str], cwd, *args: str) -> subprocess.CompletedProcess:
    return _run(["-m", "monai.bundle", "run", "--config_file", repr(configs), *args], cwd)


def _synthetic(dataset: str, out, *args: str) -> str:
    _run([os.path.join(ROOT, "scripts", "make_synthetic.py"), "--dataset", dataset, "--out", str(out), *args], ROOT)
    return str(out)


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _shared_folder(work, dataset: str) -> str:
    (folder,) = [f for f in os.listdir(os.path.join(str(work), "outputs", "shared")) if f.startswith(dataset + "-")]
    return os.path.join(str(work), "outputs", "shared", folder)


def test_odir_overlay_trains_multilabel_and_evaluate_json_rescores_it(tmp_path):
    """docs/datasets.md "Real datasets" (ODIR-5K), then docs/evaluation.md "The missing-rate sweep" on the model."""
    data = _synthetic("odir", tmp_path / "odir", "--cases", "48")
    work = tmp_path / "work"
    work.mkdir()
    overlays = [TRAIN, os.path.join(ROOT, "configs", "datasets", "odir.json")]
    i = TINY.index("--image_encoder")  # the overlay's own encoder: the ImageNet EfficientNet-Lite0, not TINY's
    tiny = TINY[:i] + TINY[i + 2 :]
    size = ["--dataset_dir", data, "--spatial_size", "[32,32]", *tiny]
    _bundle(overlays, work, *size)
    out = work / "outputs" / "odir_cmml"
    trained = _rows(out / "sweep" / "sweep.csv")
    assert [float(r["rate"]) for r in trained] == RATES
    assert all(0.0 <= float(r["auc"]) <= 1.0 for r in trained)
    # the split and the masks sit in the dataset's own shared folder, bound to its cases
    shared = _shared_folder(work, "odir")
    split = json.load(open(os.path.join(shared, "odir_split.json")))
    masks = json.load(open(os.path.join(shared, "masks_test.json")))
    assert split["fingerprint"] == masks["fingerprint"] and shared.endswith(split["fingerprint"][:12])
    assert set(masks["case_ids"]) == {c for c, s in split["splits"].items() if s == "test"}

    _bundle([*overlays, EVALUATE], work, *size)
    rescored = _rows(out / "eval" / "sweep.csv")
    # the same served model on the same saved masks: the same scores
    assert [(r["rate"], r["auc"], r["n"]) for r in rescored] == [(r["rate"], r["auc"], r["n"]) for r in trained]
    subsets = _rows(out / "eval" / "subsets.csv")
    assert len(subsets) == 7 and subsets[0]["subset"] == "left+right+table"
    for name in ["sweep.png", *(f"roc_rate{r:g}.png" for r in RATES)]:
        assert os.path.getsize(out / "eval" / name) > 0, name
    summary = json.load(open(out / "eval" / "summary.json"))
    assert summary["avg_auc"] == pytest.approx(sum(float(r["auc"]) for r in rescored) / len(rescored))
    # evaluate.json also writes each rate's per-case predictions; they give the rate's row again
    from cmml_monai.metrics import classification_metrics

    test_ids = masks["case_ids"]
    for row in rescored:
        cases = _rows(out / "eval" / f"predictions_rate{float(row['rate']):g}.csv")
        assert len(cases) == int(row["n"]) and set(c["case_id"] for c in cases) <= set(test_ids)
        labels = np.array([[int(c[k]) for k in c if k.startswith("label_")] for c in cases])
        probs = np.array([[float(c[k]) for k in c if k.startswith("prob_")] for c in cases])
        assert classification_metrics(probs, labels, True)["auc"] == pytest.approx(float(row["auc"]), abs=1e-9)
        names = [k[len("prob_") :] for k in cases[0] if k.startswith("prob_")]
        assert all(c["prediction"] == ";".join(n for n in names if float(c[f"prob_{n}"]) >= 0.5) for c in cases)


@pytest.mark.slow  # ~40 s: .ci/run runs it (pytest -m slow -k ...)
def test_men_overlay_trains_3d_from_dicom(tmp_path):
    """docs/datasets.md "Real datasets" (Meningioma) on DICOM series folders, resampled to 1 mm as the overlay says."""
    data = _synthetic("men", tmp_path / "men", "--cases", "24", "--dicom", "--shape", "16", "16", "12")
    work = tmp_path / "work"
    work.mkdir()
    proc = _bundle(
        [TRAIN, os.path.join(ROOT, "configs", "datasets", "men.json")],
        work,
        "--dataset_dir",
        data,
        "--spatial_size",
        "[32,32,32]",
        *TINY,
    )
    out = work / "outputs" / "men_cmml"
    rows = _rows(out / "sweep" / "sweep.csv")
    assert [float(r["rate"]) for r in rows] == RATES and all(0.0 <= float(r["auc"]) <= 1.0 for r in rows)
    assert os.path.isfile(out / "models" / "model.pt")
    assert "Missing-rate sweep (men" in proc.stdout + proc.stderr
    shared = _shared_folder(work, "men")
    assert sorted(os.listdir(shared)) == ["masks_test.json", "masks_valid.json", "men_split.json"]


@pytest.mark.slow  # ~45 s, four trainings: .ci/run runs it (pytest -m slow -k ...)
def test_compare_trains_methods_with_seeds_on_the_same_masks(tmp_path):
    """README "Compare with the baselines": ``scripts/compare.py --methods ... --seeds ...`` trains and tables."""
    out = tmp_path / "cmp"
    proc = _run(
        [
            os.path.join(ROOT, "scripts", "compare.py"),
            "--methods",
            "cmml",
            "zero_fill",
            "--seeds",
            "0",
            "1",
            "--out",
            str(out),
            "--",
            "--dataset_dir",
            str(tmp_path / "syn"),
            "--synthetic_cases",
            "30",
            "--spatial_size",
            "[32,32]",
            "--missing_rates",
            "[0.0,0.5]",
            "--sweep#subsets",
            "false",
            "--sweep#roc",
            "false",
            *TINY,
        ],
        tmp_path,
    )
    table = _rows(out / "comparison.csv")
    assert [r["method"] for r in table] == ["cmml", "zero_fill"] and all(int(r["runs"]) == 2 for r in table)
    (paired,) = _rows(out / "comparison_paired.csv")
    assert paired["method"] == "zero_fill" and paired["reference"] == "cmml" and int(paired["pairs"]) == 2
    assert float(paired["CI low"]) <= float(paired["AVG AUC diff"]) <= float(paired["CI high"])
    # every run used the one shared mask file
    runs = [out / f"{m}_seed{s}" for m in ("cmml", "zero_fill") for s in (0, 1)]
    assert all(os.path.isfile(r / "sweep" / "sweep.csv") for r in runs)
    masks = [f for f in os.listdir(out / "shared") if f.startswith("masks_")]
    assert sorted(masks) == ["masks_test.json", "masks_valid.json"]
    assert "seed-paired AVG AUC difference against cmml" in proc.stdout
