"""``scripts/package_bundle.py`` (issue #17): a self-contained model-zoo-style bundle from a trained run.

One tiny run of configs/train.json (synthetic Derm7pt, 32 px, resnet10, d=16, 1 + 1 epochs, sweep with
subsets) is packaged once per module, as a folder and a zip. The tests reproduce each check of model-zoo's
``ci/verify_bundle.py -m full`` (necessary and preferred files, version and changelog, metadata against
MONAI's schema offline, the inference config's workflow properties, the network's input/output shapes
and the TorchScript export through ``monai.bundle.ckpt_export`` plus loading the provided ``model.ts``) and
run the packaged ``inference.json`` from another working directory.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, create_workflow, verify_metadata, verify_net_in_out
from monai.data import MetaTensor

from cmml_monai.data.errors import DataError
from cmml_monai.deploy import load_description, load_network
from cmml_monai.deploy.export import example_inputs
from cmml_monai.deploy.package import bundle_metadata, package_bundle, packaged_inference_config

from bundle_helpers import read_predictions, run_bundle, train_tiny_derm7pt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFERENCE = os.path.join(ROOT, "configs", "inference.json")
SCRIPT = os.path.join(ROOT, "scripts", "package_bundle.py")
SCHEMA = os.path.join(ROOT, "tests", "data", "meta_schema_20240725.json")
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
NAME = "derm7pt_tiny"
CLASSES = ["BCC", "NEV", "MEL", "MISC", "SK"]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> dict:
    """``{"run", "data", "bundle", "zip"}``: the trained run, its data and the packaged bundle (folder, zip)."""
    root = tmp_path_factory.mktemp("package")
    data, run, w = train_tiny_derm7pt(root, **{"sweep#subsets": True})
    w.finalize()
    out = str(root / "bundle" / NAME)
    done = subprocess.run(
        [sys.executable, SCRIPT, run, "--out", out, "--zip", "--version", "1.0.0", "--changelog", "first tiny bundle"],
        cwd=str(root),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"run": run, "data": data, "bundle": out, "zip": out + ".zip"}


def _json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _predict(config: str, bundle_root: str, data: str, cwd: str, *extra: str) -> dict[str, dict[str, str]]:
    """Run ``config`` with ``python -m monai.bundle run`` in ``cwd``; the rows of ./predictions/predictions.csv."""
    done = run_bundle(config, bundle_root, "--dataset_dir", data, *extra, cwd=cwd, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return read_predictions(os.path.join(cwd, "predictions"))


# -- what the bundle holds ------------------------------------------------------------------------------


def test_bundle_layout_metadata_and_model_card(packaged):
    b = packaged["bundle"]
    files = sorted(os.path.relpath(os.path.join(d, f), b) for d, _, fs in os.walk(b) for f in fs)
    assert files == [
        "LICENSE",
        "configs/evaluate.json",
        "configs/inference.json",
        "configs/logging.conf",
        "configs/metadata.json",
        "docs/README.md",
        "models/model.pt",
        "models/model.ts",
        "models/network.json",
    ]
    meta = _json(os.path.join(b, "configs", "metadata.json"))
    assert meta["version"] == "1.0.0" and meta["changelog"] == {"1.0.0": "first tiny bundle"}
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 6 and fmt["inputs"]["image"]["spatial_shape"] == [32, 32]
    assert list(fmt["inputs"]["image"]["channel_def"].values())[:4] == ["clinic R", "clinic G", "clinic B", "derm R"]
    assert list(fmt["inputs"]["tabular"]["channel_def"].values()) == ["elevation", "location", "sex"]
    pred = fmt["outputs"]["pred"]
    assert pred["type"] == "logits" and "softmax" in pred["format"]
    assert list(pred["channel_def"].values()) == CLASSES
    summary = _json(os.path.join(packaged["run"], "sweep", "summary.json"))
    assert meta["eval_metrics"]["avg_auc_test"] == pytest.approx(summary["avg_auc"])
    assert meta["required_packages_version"]["cmml-monai"]
    card = open(os.path.join(b, "docs", "README.md"), encoding="utf-8").read()
    with open(os.path.join(packaged["run"], "sweep", "subsets.csv"), newline="") as f:
        subsets = list(csv.DictReader(f))
    assert "## Limitations" in card and "| 0.5 |" in card and "ece" in card
    assert all(f"| {r['subset']} | {float(r['auc']):.3f} |" in card for r in subsets)
    # the description travels with the weights it was written for
    desc = load_description(os.path.join(b, "models"))
    assert desc["data"]["class_names"] == CLASSES and desc["weights_sha256"]
    # the card names the trained method and backbone from the description (not a default)
    encoder = desc["network"]["args"]["encoder"]["image_encoder"]
    assert f"- Method: `{desc['network']['method']}`, image encoder `{encoder}`," in card
    with zipfile.ZipFile(packaged["zip"]) as z:
        assert sorted(n for n in z.namelist() if not n.endswith("/")) == [f"{NAME}/{f}" for f in files]


def test_version_must_be_in_the_changelog(packaged):
    desc = load_description(packaged["run"])
    with pytest.raises(ValueError, match="'2.0.0' is not in the changelog"):
        bundle_metadata(desc, packaged["run"], "2.0.0", {"1.0.0": "x"})
    with pytest.raises(ValueError, match=r"has no \['case_list'\]"):
        packaged_inference_config({k: v for k, v in _json(INFERENCE).items() if k != "case_list"})


def test_package_errors_are_one_line(packaged, tmp_path):
    (tmp_path / "models").mkdir()
    bad = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path), "--out", str(tmp_path / "b")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert bad.returncode == 2 and len(errors) == 1 and "network.json" in errors[0] and "Traceback" not in bad.stderr
    # the same main prints any DataError / ValueError as that one line: here the library's refusal alone
    with pytest.raises((DataError, ValueError), match=r"already exists.*--overwrite"):
        package_bundle(packaged["run"], packaged["bundle"])
    assert not [f for f in os.listdir(os.path.dirname(packaged["bundle"])) if f.startswith(".")]  # no leftovers


# -- model-zoo's verify_bundle -m full, check by check ----------------------------------------------------


@pytest.fixture()
def zoo(packaged, tmp_path) -> str:
    """The bundle in a model-zoo checkout's layout (``models/<name>``); the checks write into their copy."""
    path = str(tmp_path / "models" / NAME)
    shutil.copytree(packaged["bundle"], path)
    return path


def test_verify_bundle_directory_and_version(zoo):
    # necessary files, then preferred ones (the inference config may be .json, .yaml or .yml)
    assert os.path.isfile(os.path.join(zoo, "LICENSE")) and os.path.isfile(os.path.join(zoo, "configs/metadata.json"))
    assert os.path.isfile(os.path.join(zoo, "models/model.pt"))
    assert [f for f in os.listdir(os.path.join(zoo, "configs")) if f.split(".")[0] == "inference"] == ["inference.json"]
    meta = _json(os.path.join(zoo, "configs", "metadata.json"))
    assert "version" in meta and "changelog" in meta and meta["version"] in meta["changelog"]
    model_info: dict = {}  # model-zoo's released bundles: a new bundle's name_vVERSION must not be there
    assert f"{NAME}_v{meta['version']}" not in model_info


def test_verify_metadata_format_offline(zoo):
    # verify_metadata downloads the schema unless the file is already at filepath (model-zoo: eval/schema.json)
    os.makedirs(os.path.join(zoo, "eval"))
    shutil.copy(SCHEMA, os.path.join(zoo, "eval", "schema.json"))
    verify_metadata(
        meta_file=os.path.join(zoo, "configs", "metadata.json"), filepath=os.path.join(zoo, "eval", "schema.json")
    )


def test_verify_inference_properties(zoo, packaged):
    w = create_workflow(
        workflow_type="inference",
        config_file=os.path.join(zoo, "configs", "inference.json"),
        bundle_root=zoo,
        logging_file=os.path.join(zoo, "configs", "logging.conf"),
        meta_file=os.path.join(zoo, "configs", "metadata.json"),
        dataset_dir=packaged["data"],
        progress_bar=False,
    )
    assert not w.check_properties()  # every required inference and metadata property is there
    assert w.version == "1.0.0" and isinstance(w.network_def, torch.nn.Module)


def test_verify_data_shape_and_torchscript(zoo):
    config, meta = os.path.join(zoo, "configs", "inference.json"), os.path.join(zoo, "configs", "metadata.json")
    # as model-zoo calls it (image only: the table is optional), then with the table too
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=zoo)
    desc = load_description(os.path.join(zoo, "models"))
    image, tabular = example_inputs(desc, batch_size=1)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # verify_net_in_out's own default
    verify_net_in_out(
        net_id="network_def",
        meta_file=meta,
        config_file=config,
        bundle_root=zoo,
        device=device,
        extra_forward_args={"tabular": tabular.to(device)},
    )
    # ckpt_export scripts network_def with the bundle's weights; the provided model.ts must load
    out = os.path.join(zoo, "models", "verify_model.ts")
    ckpt_export(
        net_id="network_def",
        filepath=out,
        ckpt_file=os.path.join(zoo, "models", "model.pt"),
        meta_file=meta,
        config_file=config,
        bundle_root=zoo,
    )
    scripted = torch.jit.load(out, map_location="cpu")
    provided = torch.jit.load(os.path.join(zoo, "models", "model.ts"), map_location="cpu")
    with torch.no_grad():
        assert torch.allclose(scripted(image, tabular), provided(image, tabular), atol=1e-4)


# -- the packaged inference.json from elsewhere -------------------------------------------------------------


@pytest.mark.slow  # ~45 s, two bundle runs in subprocesses: .ci/run runs it (pytest -m slow -k ...)
def test_packaged_inference_runs_from_another_working_directory(packaged, tmp_path):
    # the folder, and the zip unpacked somewhere else; neither run's cwd is the bundle or the checkout
    unpacked = tmp_path / "unzipped"
    with zipfile.ZipFile(packaged["zip"]) as z:
        z.extractall(unpacked)
    runs = []
    for i, bundle in enumerate([packaged["bundle"], str(unpacked / NAME)]):
        cwd = tmp_path / f"cwd{i}"
        cwd.mkdir()
        runs.append(_predict(os.path.join(bundle, "configs", "inference.json"), bundle, packaged["data"], str(cwd)))
    assert runs[0] == runs[1] and len(runs[0]) == 29  # the synthetic set's one empty case gets no prediction
    # the same numbers as the project's inference.json on the run's own models/
    w = create_workflow(
        workflow_type="inference",
        config_file=INFERENCE,
        bundle_root=ROOT,
        model_dir=os.path.join(packaged["run"], "models"),
        dataset_dir=packaged["data"],
        output_dir=str(tmp_path / "reference"),
        progress_bar=False,
        logging_file=False,
        meta_file=os.path.join(ROOT, "configs", "metadata.json"),
    )
    w.run()
    with open(tmp_path / "reference" / "predictions.csv", newline="") as f:
        reference = {r["case_id"]: r for r in csv.DictReader(f)}
    assert sorted(reference) == sorted(runs[0])
    for case_id, row in reference.items():
        got = [float(runs[0][case_id][f"prob_{c}"]) for c in CLASSES]
        assert got == pytest.approx([float(row[f"prob_{c}"]) for c in CLASSES], abs=1e-5), case_id


def test_packaged_inference_writes_case_pages_on_request(packaged, tmp_path):
    """Issue #32: ``--explain true`` on the packaged inference.json: one page per predicted case and the index."""
    from PIL import Image

    from cmml_monai.evaluation.casepage import PAGE_SIZE

    rows = _predict(
        os.path.join(packaged["bundle"], "configs", "inference.json"),
        packaged["bundle"],
        packaged["data"],
        str(tmp_path),
        "--explain",
        "true",
        "--split",
        "test",
    )
    cases = tmp_path / "predictions" / "cases"
    pages = sorted(p.name for p in cases.glob("*.png"))
    assert pages == sorted(f"{c}.png" for c in rows) and rows
    with Image.open(cases / pages[0]) as im:
        assert im.size == PAGE_SIZE
    index = (cases / "index.html").read_text(encoding="utf-8")
    assert all(f'href="{p}"' in index for p in pages)
    card = open(os.path.join(packaged["bundle"], "docs", "README.md"), encoding="utf-8").read()
    assert "--explain true" in card and "do not show where a lesion is" in card


def test_packaged_evaluate_scores_labelled_cases(packaged, tmp_path, monkeypatch):
    b = packaged["bundle"]
    monkeypatch.chdir(tmp_path)  # outputs go to ./evaluation of the working directory
    w = create_workflow(
        workflow_type="inference",
        bundle_root=b,
        logging_file=False,
        dataset_dir=packaged["data"],
        split="test",
        progress_bar=False,
        config_file=[os.path.join(b, "configs", "inference.json"), os.path.join(b, "configs", "evaluate.json")],
    )
    w.run()
    metrics = _json(str(tmp_path / "evaluation" / "metrics.json"))
    with open(os.path.join(packaged["run"], "sweep", "sweep.csv"), newline="") as f:
        full = next(r for r in csv.DictReader(f) if float(r["rate"]) == 0.0)
    # the test split with its own missingness: what the run's sweep measured at rate 0
    assert metrics["all"]["n"] == int(full["n"])
    assert metrics["all"]["auc"] == pytest.approx(float(full["auc"]), abs=1e-4)
    assert sum(m["n"] for m in metrics["by_present"].values()) == metrics["all"]["n"]


# -- MONAI Label's keys of the packaged inference.json (monailabel itself: tests/test_monai_label.py, slow) -------


def test_packaged_monai_label_keys_answer_an_image_only_request(packaged, tmp_path):
    b = packaged["bundle"]
    parser = ConfigParser()
    parser.read_config(os.path.join(b, "configs", "inference.json"))
    parser["bundle_root"] = b  # what MONAI Label's BundleInferTask sets
    pre, post = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")
    inferer, network = parser.get_parsed_content("inferer"), load_network(os.path.join(b, "models"))
    image = sorted(os.path.join(d, f) for d, _, fs in os.walk(packaged["data"]) for f in fs if f.endswith(".jpg"))[0]
    # as BasicInferTask runs them: pre-transforms, the inferer on a batch of one, decollate, post-transforms
    item = pre({"image": image, "modality": "derm", "device": "cpu"})
    assert item["image"].shape == (6, 32, 32) and bool(item["image"][:3].isnan().all())  # clinic missing
    with torch.no_grad():
        pred = post({"pred": inferer(item["image"][None], network)[0]})["pred"]
    assert isinstance(pred, MetaTensor)  # monailabel's ClassificationWriter reads pred.array
    # inference.json on the same case given as a manifest row with only that image
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"case_id,clinic,derm,elevation,location,sex\nq1,,{image},,,\n")
    w = create_workflow(
        workflow_type="inference",
        config_file=os.path.join(b, "configs", "inference.json"),
        bundle_root=b,
        dataset_name="manifest",
        dataset_dir=str(manifest),
        logging_file=False,
        output_dir=str(tmp_path / "pred"),
        progress_bar=False,
    )
    w.run()
    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["present"] == "derm"
    assert pred.tolist() == pytest.approx([float(row[f"prob_{c}"]) for c in CLASSES], abs=1e-5)
    with pytest.raises(DataError, match=r"modality 'ct' is not one of the network's image modalities"):
        pre.transforms[0]({"image": image, "modality": "ct"})  # (Compose wraps it in a RuntimeError)
