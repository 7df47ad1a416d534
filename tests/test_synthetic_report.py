"""Synthetic generator vs inspect_data: every count agrees; scripts fail cleanly; the label is learnable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cmml_monai.data.adapters import load_dataset
from cmml_monai.data.errors import DataError
from cmml_monai.data.report import format_summary, summarize
from cmml_monai.data.synthetic import MANIFEST_NAME, ensure_synthetic, make_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE = os.path.join(REPO, "scripts", "make_synthetic.py")
INSPECT = os.path.join(REPO, "scripts", "inspect_data.py")


def _run(*args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("dataset,cases", [("derm7pt", 14), ("odir", 14), ("men", 12)])
def test_make_synthetic_and_inspect_data_agree(dataset, cases, tmp_path):
    out = tmp_path / dataset
    made = _run(MAKE, "--dataset", dataset, "--out", str(out), "--cases", str(cases), "--seed", "3", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    # run from another working directory: the scripts must not depend on it
    seen = _run(INSPECT, "--dataset", dataset, "--dataset_dir", str(out), "--json", cwd="/")
    assert seen.returncode == 0, seen.stderr
    summary = json.loads(seen.stdout)
    for key in ("n_cases", "splits", "label_counts", "missing", "missing_reasons", "dropped"):
        assert summary[key] == manifest[key], key
    assert summary["n_cases"] == cases - 1 and summary["dropped"] == 1
    assert sum(summary["splits"].values()) == summary["n_cases"]
    assert {c["name"] for c in summary["table_columns"]} and all(
        0.0 <= c["missing_rate"] <= 1.0 for c in summary["table_columns"]
    )
    text = _run(INSPECT, "--dataset", dataset, "--dataset_dir", str(out), cwd=tmp_path)
    assert text.returncode == 0 and f"{summary['n_cases']} cases" in text.stdout and "dropped cases: 1" in text.stdout


def test_scripts_fail_cleanly(tmp_path):
    bad = _run(INSPECT, "--dataset", "odir", "--dataset_dir", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert bad.stdout == ""
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    busy = _run(MAKE, "--dataset", "men", "--out", str(tmp_path / "busy"), cwd=tmp_path)
    assert busy.returncode == 2 and "not empty" in busy.stderr and "Traceback" not in busy.stderr
    assert os.listdir(tmp_path / "busy") == ["file.txt"]
    # nothing half-written is left next to the output
    assert sorted(os.listdir(tmp_path)) == ["busy"]


def test_ensure_synthetic_idempotent(tmp_path):
    out = tmp_path / "men"
    path = ensure_synthetic("men", out, cases=12, seed=1)
    assert path == str(out) and (out / MANIFEST_NAME).is_file()
    stamp = (out / MANIFEST_NAME).stat().st_mtime_ns
    assert ensure_synthetic("men", out, cases=12, seed=1) == path
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="delete it"):
        ensure_synthetic("men", out, cases=13, seed=1)
    with pytest.raises(ValueError, match="dicom"):
        make_synthetic("odir", tmp_path / "x", cases=12, dicom=True)
    with pytest.raises(ValueError, match="cases"):
        make_synthetic("odir", tmp_path / "x", cases=3)
    # same seed, same data
    other = make_synthetic("men", tmp_path / "men2", cases=12, seed=1)
    assert other == json.loads((out / MANIFEST_NAME).read_text())


def test_report_text_lists_reasons(synthetic_dataset):
    root, _ = synthetic_dataset("derm7pt", 24)
    s = summarize(load_dataset("derm7pt", root))
    text = format_summary(s)
    assert "clinic == derm" in text and "elevation" in text and "categorical" in text
    assert s["missing_reasons"]["clinic"]["clinic == derm"] == s["missing"]["clinic"]


def _loo_nearest_centroid(x: np.ndarray, y: np.ndarray) -> float:
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    hits = 0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        cents = {c: x[keep & (y == c)].mean(0) for c in np.unique(y[keep])}
        pred = min(cents, key=lambda c: np.sum((x[i] - cents[c]) ** 2))
        hits += pred == y[i]
    return hits / len(y)


def test_label_signal_in_every_modality(synthetic_dataset):
    """Each modality alone predicts the class above chance at 16 px; together they do better."""
    root, _ = synthetic_dataset("derm7pt", 60)
    cl = load_dataset("derm7pt", root)
    cases = [c for c in cl.cases if all(cl.present(c))]
    y = np.array([c.label for c in cases])
    chance = np.bincount(y).max() / len(y)
    feats = {}
    for m in ("clinic", "derm"):
        feats[m] = np.stack(
            [
                np.asarray(Image.open(c.paths[m]).convert("RGB").resize((16, 16)), np.float32)[4:12, 4:12].mean((0, 1))
                for c in cases
            ]
        )
    # the default table columns, one-hot
    values = {col: sorted({str(c.table[col]) for c in cases}) for col in cl.table_columns}
    feats["table"] = np.array([[float(str(c.table[col]) == v) for col in values for v in values[col]] for c in cases])
    acc = {m: _loo_nearest_centroid(f, y) for m, f in feats.items()}
    both = _loo_nearest_centroid(np.concatenate([feats["clinic"], feats["derm"]], 1), y)
    assert all(a > chance + 0.1 for a in acc.values()), (acc, chance)
    # the two images share part of the evidence and add their own: together no worse than on average alone
    assert both > chance + 0.2 and both >= (acc["clinic"] + acc["derm"]) / 2, (both, acc)


def test_training_seed_does_not_redraw_the_synthetic_data(tmp_path):
    """train.json: --seed is the training seed; the synthetic data follow synthetic_seed, so several
    training seeds share one dataset folder (scripts/compare.py --seeds on the default data)."""
    from monai.bundle import ConfigParser

    manifests = []
    for seed in (0, 3):
        parser = ConfigParser()
        parser.read_config(os.path.join(REPO, "configs", "train.json"))
        parser.update({"bundle_root": REPO, "dataset_dir": str(tmp_path / "syn"), "synthetic_cases": 14, "seed": seed})
        parser.get_parsed_content("case_list")  # generates on the first call, reuses on the second
        manifests.append(json.loads((tmp_path / "syn" / MANIFEST_NAME).read_text()))
    assert manifests[0] == manifests[1] and manifests[0]["params"]["seed"] == 0
    parser.update({"synthetic_seed": 1})
    with pytest.raises(RuntimeError) as failure:  # another draw needs its own folder
        parser.get_parsed_content("case_list", lazy=False)
    assert isinstance(failure.value.__cause__, DataError) and "'seed': 1" in str(failure.value.__cause__)
