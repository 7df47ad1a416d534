"""Serving a trained run (issue #17): the network description, configs/inference.json and the TorchScript export.

One tiny run of configs/train.json (synthetic Derm7pt, 32 px, resnet10, d=16, 1 + 1 epochs, with a
``network_def`` override) is trained once per module; every test serves that run's ``models/`` folder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil

import pandas as pd
import pytest
import torch

from cmml_monai.data.adapters import load_dataset
from cmml_monai.data.adapters.odir import ODIR_LABELS
from cmml_monai.data.dataset import build_dataset
from cmml_monai.data.errors import DataError
from cmml_monai.data.setup import DatasetInfo, fit_schema
from cmml_monai.data.synthetic import make_synthetic
from cmml_monai.deploy import (
    DESCRIPTION_NAME,
    Predictor,
    build_from_description,
    check_cases,
    completes_missing,
    inference_dataset,
    load_description,
    load_network,
    probabilities,
    save_description,
)
from cmml_monai.deploy.export import check_export, example_inputs, export_onnx, main
from cmml_monai.deploy.inference import inference_cases
from cmml_monai.networks import CMMLOptions, InputSpec, LateFusionNet

from bundle_helpers import RESNET10, read_predictions, run_bundle, tiny_overrides, workflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.json")
DESCRIBE = os.path.join(ROOT, "configs", "describe.json")
INFERENCE = os.path.join(ROOT, "configs", "inference.json")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the configs' default device
NUM_BLOCKS = 2  # not the default (3): a description that lost the override would not fit the weights


def train_args(dataset_dir: str, out: str, **extra) -> dict:
    overrides = {"synthetic": False, "crta#num_blocks": NUM_BLOCKS, "run_sweep": False, "missing_rates": [0.0]}
    return tiny_overrides(dataset_dir, out, **{**overrides, **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The default job, tiny: ``{"out", "models", "data"}``."""
    root = tmp_path_factory.mktemp("served")
    data = str(root / "derm7pt")
    make_synthetic("derm7pt", data, cases=30, seed=0)
    out = str(root / "run")
    w = workflow(TRAIN, **train_args(data, out))
    w.run()
    w.finalize()
    return {"out": out, "models": os.path.join(out, "models"), "data": data}


def reference_probabilities(trained: dict, dataset_dir: str) -> dict[str, list[float]]:
    """softmax(net(image, tabular)) per test case, with the network and items of the training config
    (built from the training data and loaded from model.pt), not through cmml_monai.deploy."""
    w = workflow(TRAIN, **train_args(dataset_dir, trained["out"], **{"schema#reuse": True}))
    net = w.parser.get_parsed_content("network_def")
    state = torch.load(os.path.join(trained["models"], "model.pt"), map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("network", state))
    device = w.parser.get_parsed_content("device")  # inference.json's default device too
    net.to(device).eval()
    dataset = w.parser.get_parsed_content("test_dataset")
    out = {}
    with torch.no_grad():
        for item in dataset:
            logits = net(item["image"][None].to(device), item["tabular"][None].to(device))
            out[item["case_id"]] = torch.softmax(logits, dim=1)[0].tolist()
    return out


# -- 1. the description ------------------------------------------------------------------------------


def test_description_rebuilds_the_served_network_alone(trained, tmp_path):
    # only network.json and model.pt travel: no training data, no table_schema.json, no config
    served = str(tmp_path / "served")
    os.makedirs(served)
    for name in (DESCRIPTION_NAME, "model.pt"):
        shutil.copy(os.path.join(trained["models"], name), served)
    desc = load_description(served)
    args = desc["network"]["args"]
    assert desc["network"]["target"] == "cmml_monai.networks.CMMLNet" and desc["network"]["method"] == "cmml"
    assert args["crta"] == {
        "_target_": "cmml_monai.networks.CascadedResidualTransformerAE",
        "num_blocks": NUM_BLOCKS,
        "mlp_ratio": 2.0,
        "reads_context": True,
    }
    # the input spec and the options are written as the config gives them, and rebuilt as objects
    spec = args["spec"]
    assert spec["_target_"] == "cmml_monai.networks.InputSpec" and spec["num_classes"] == 5
    assert (spec["image_modalities"], spec["image_channels"], spec["multi_label"]) == (2, 3, False)
    assert args["options"] == {"_target_": "cmml_monai.networks.CMMLOptions", **dataclasses.asdict(CMMLOptions())}
    assert args["context"] == {"_target_": "cmml_monai.networks.ContextTokens", "num_tokens": 8, "conditioned": False}
    assert args["feature_dim"] == 16
    assert desc["data"]["class_names"] == ["BCC", "NEV", "MEL", "MISC", "SK"]
    assert [m["name"] for m in desc["data"]["modalities"]] == ["clinic", "derm", "table"]
    assert desc["preprocessing"]["spatial_size"] == [32, 32] and desc["inputs"]["image"] == [6, 32, 32]
    assert desc["data"]["table_schema"]["columns"][0]["name"] == "elevation"
    net = load_network(served)
    assert not net.training
    w = workflow(TRAIN, **train_args(trained["data"], trained["out"], **{"schema#reuse": True}))
    reference = w.parser.get_parsed_content("network_def")
    state = torch.load(os.path.join(served, "model.pt"), map_location="cpu", weights_only=True)
    reference.load_state_dict(state.get("network", state))
    reference.eval()
    item = w.parser.get_parsed_content("test_dataset")[0]
    with torch.no_grad():
        expected = reference(item["image"][None], item["tabular"][None])
        got = net.to("cpu")(item["image"][None], item["tabular"][None])
    assert torch.equal(got, expected)


def test_description_errors(trained, tmp_path):
    empty = tmp_path / "old_run"
    (empty / "models").mkdir(parents=True)
    shutil.copy(os.path.join(trained["models"], "model.pt"), empty / "models")
    with pytest.raises(DataError, match="configs/describe.json"):
        load_network(str(empty))
    # a checkpoint of another architecture: the message names the tensors that differ
    desc = load_description(trained["models"])
    crta = {**desc["network"]["args"]["crta"], "num_blocks": NUM_BLOCKS + 1}
    other = dict(desc, network={**desc["network"], "args": {**desc["network"]["args"], "crta": crta}})
    bad = str(tmp_path / "other.pt")
    torch.save(build_from_description(other).state_dict(), bad)
    with pytest.raises(DataError, match=r"does not fit .*tensors missing|unexpected.*crta"):
        load_network(trained["models"], checkpoint=bad)
    wide = dict(desc, network={**desc["network"], "args": {**desc["network"]["args"], "feature_dim": 32}})
    torch.save(build_from_description(wide).state_dict(), bad)
    with pytest.raises(DataError, match=r"shapes differ, checkpoint vs description \(e\.g\. .*\[.*32"):
        load_network(trained["models"], checkpoint=bad)


def test_describe_overlay_writes_the_description_of_an_older_run(trained, tmp_path):
    old = str(tmp_path / "old")
    os.makedirs(os.path.join(old, "models"))
    shutil.copy(os.path.join(trained["out"], "table_schema.json"), old)
    shutil.copy(os.path.join(trained["models"], "model.pt"), os.path.join(old, "models"))
    w = workflow([TRAIN, DESCRIBE], **train_args(trained["data"], old))
    w.run()
    assert load_description(os.path.join(old, "models")) == {
        **load_description(trained["models"]),
        "model_dir": os.path.join(old, "models"),
    }


# -- 2. configs/inference.json -----------------------------------------------------------------------


def _incomplete_copy(trained: dict, dest: str) -> tuple[str, str, str]:
    """A copy of the dataset in which one test case has images only and another the table only."""
    shutil.copytree(trained["data"], dest)
    meta_path = os.path.join(dest, "release_v0", "meta", "meta.csv")
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    test_rows = pd.read_csv(os.path.join(dest, "release_v0", "meta", "test_indexes.csv"))["indexes"].tolist()
    has_table = [r for r in test_rows if (meta.loc[r, ["elevation", "location", "sex"]] != "").any()]
    table_only = has_table[0]
    image_only = next(r for r in test_rows if r != table_only)
    meta.loc[image_only, ["elevation", "location", "sex"]] = ""
    meta.loc[image_only, "derm"] = meta.loc[image_only, "clinic"]  # one real image file, listed once
    meta.loc[image_only, "clinic"] = "no/such_file.jpg"
    meta.loc[table_only, ["clinic", "derm"]] = "no/such_file.jpg"
    meta.to_csv(meta_path, index=False)
    return dest, str(meta.loc[image_only, "case_num"]), str(meta.loc[table_only, "case_num"])


def test_inference_bundle_predicts_image_only_and_table_only_cases(trained, tmp_path):
    data, image_only, table_only = _incomplete_copy(trained, str(tmp_path / "new_cases"))
    pred = str(tmp_path / "pred")
    done = run_bundle(
        INFERENCE,
        ROOT,
        "--model_dir",
        trained["models"],
        "--dataset_dir",
        data,
        "--dataset",
        "derm7pt",
        "--output_dir",
        pred,
        "--split",
        "test",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_predictions(pred)
    classes = ["BCC", "NEV", "MEL", "MISC", "SK"]
    header = list(next(iter(rows.values())))
    assert header == ["case_id", *[f"prob_{c}" for c in classes], "prediction", "present", "completed"]
    reference = reference_probabilities(trained, data)
    assert sorted(rows) == sorted(reference)
    for case_id, row in rows.items():
        probs = [float(row[f"prob_{c}"]) for c in classes]
        assert probs == pytest.approx(reference[case_id], abs=1e-5 if DEVICE == "cpu" else 1e-4), case_id
        assert row["prediction"] == classes[max(range(5), key=probs.__getitem__)]
    assert (rows[image_only]["present"], rows[image_only]["completed"]) == ("derm", "clinic;table")
    assert (rows[table_only]["present"], rows[table_only]["completed"]) == ("table", "clinic;derm")
    with open(os.path.join(pred, "cases", f"{table_only}.json")) as f:
        record = json.load(f)
    assert "label" not in record and record["present"] == ["table"]
    logits = torch.tensor([record["logits"]])
    assert list(record["probabilities"].values()) == pytest.approx(probabilities(logits, False)[0].tolist())


def test_inference_bundle_without_description_prints_one_line(trained, tmp_path):
    old_run = tmp_path / "models"
    old_run.mkdir()
    shutil.copy(os.path.join(trained["models"], "model.pt"), old_run)
    done = run_bundle(
        INFERENCE,
        ROOT,
        "--model_dir",
        str(old_run),
        "--dataset_dir",
        trained["data"],
        "--dataset",
        "derm7pt",
        "--output_dir",
        str(tmp_path / "pred"),
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "configs/describe.json" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_inference_refuses_a_dataset_with_other_inputs(trained):
    desc = load_description(trained["models"])
    cases = inference_cases(desc, "derm7pt", trained["data"])
    check_cases(desc, cases)  # the training layout fits
    with pytest.raises(DataError, match="table columns"):
        inference_cases(desc, "derm7pt", trained["data"], {"extra_table_columns": ["seven_point_score"]})


# -- 3. TorchScript export with both inputs ------------------------------------------------------------


def test_torchscript_export_takes_image_and_table_and_matches_eager(trained, tmp_path, capsys):
    out = str(tmp_path / "model.ts")
    assert main([trained["models"], "--out", out]) == 0
    printed = capsys.readouterr().out
    extra = {DESCRIPTION_NAME: ""}
    exported = torch.jit.load(out, map_location="cpu", _extra_files=extra)
    desc = load_description(trained["models"])
    assert json.loads(extra[DESCRIPTION_NAME])["network"] == desc["network"]
    net = load_network(trained["models"]).to("cpu")
    diffs = check_export(exported, net, desc, batch_size=5, seed=3)
    # 2^3 - 1 patterns of clinic, derm, table, each named in the printed report too
    assert len(diffs) == 7 and set(diffs) == {
        "clinic+derm+table",
        "clinic+derm",
        "clinic+table",
        "derm+table",
        "clinic",
        "derm",
        "table",
    }
    assert max(diffs.values()) <= 1e-4, diffs
    assert all(f"  {p}: " in printed for p in diffs)
    # the table reaches the exported graph: dropping it changes the logits
    image, tabular = example_inputs(desc, batch_size=4, seed=5)
    with torch.no_grad():
        with_table = exported(image, tabular)
        without = exported(image, torch.full_like(tabular, float("nan")))
        assert torch.allclose(without, net(image, None), atol=1e-4)
    assert (with_table - without).abs().max() > 1e-4


def test_export_without_description_is_one_line(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    assert main([str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "describe.json" in err


# -- new cases need no label -------------------------------------------------------------------------


def test_inference_needs_no_label_and_no_split(trained, tmp_path):
    """Derm7pt without the diagnosis column and the index files predicts every case as the labelled layout."""
    data = str(tmp_path / "unlabelled")
    shutil.copytree(trained["data"], data)
    meta_dir = os.path.join(data, "release_v0", "meta")
    meta = pd.read_csv(os.path.join(meta_dir, "meta.csv"), dtype=str, keep_default_na=False)
    meta.drop(columns=["diagnosis"]).to_csv(os.path.join(meta_dir, "meta.csv"), index=False)
    for name in ("train_indexes.csv", "valid_indexes.csv", "test_indexes.csv"):
        os.remove(os.path.join(meta_dir, name))
    desc = load_description(trained["models"])
    net = load_network(trained["models"], device="cpu")
    results = {}
    for name, folder in (("labelled", trained["data"]), ("unlabelled", data)):
        cases = inference_cases(desc, "derm7pt", folder)
        path = Predictor(net, inference_dataset(desc, cases), desc, str(tmp_path / name), progress=False).run()
        with open(path, newline="") as f:
            results[name] = {r["case_id"]: r for r in csv.DictReader(f)}
    assert len(results["unlabelled"]) == len(results["labelled"]) >= 25
    assert results["unlabelled"] == results["labelled"]
    with pytest.raises(DataError, match="diagnosis"):  # training still needs the labels
        load_dataset("derm7pt", data)


@pytest.mark.parametrize("dataset, label_columns", [("odir", ODIR_LABELS), ("men", ["grade"])])
def test_adapters_read_new_cases_without_labels(dataset, label_columns, tmp_path):
    folder = str(tmp_path / dataset)
    make_synthetic(dataset, folder, cases=12, seed=0, **({"shape": (8, 8, 8)} if dataset == "men" else {}))
    labelled = load_dataset(dataset, folder)
    table = next(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith((".csv", ".xlsx")))
    df = pd.read_excel(table) if table.endswith(".xlsx") else pd.read_csv(table)
    df = df.drop(columns=label_columns + [c for c in df.columns if "Keywords" in c or c == "split"])
    df.to_excel(table, index=False) if table.endswith(".xlsx") else df.to_csv(table, index=False)
    with pytest.raises(DataError):
        load_dataset(dataset, folder)
    new = load_dataset(dataset, folder, labels=False)
    assert [c.case_id for c in new.cases] == [c.case_id for c in labelled.cases]
    assert all(c.label is None and c.split == "" for c in new.cases)
    assert [c.paths for c in new.cases] == [c.paths for c in labelled.cases]


def test_onnx_export_takes_image_and_table_with_a_dynamic_batch(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    out = str(tmp_path / "model.onnx")
    path, diffs = export_onnx(trained["models"], out=out)
    assert len(diffs) == 7 and max(diffs.values()) <= 1e-4, diffs
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["image", "tabular"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[DESCRIPTION_NAME])["network"] == load_description(trained["models"])["network"]
    desc = load_description(trained["models"])
    net = load_network(trained["models"]).to("cpu")
    image, tabular = example_inputs(desc, batch_size=6, seed=7)  # another batch size than the export's
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": image.numpy(), "tabular": tabular.numpy()})[0]
    with torch.no_grad():
        assert got.shape == (6, 5) and torch.allclose(torch.from_numpy(got), net(image, tabular), atol=1e-4)


def test_multi_label_inference_uses_a_sigmoid_per_label(tmp_path):
    """ODIR layout (multi-label), trained tiny, predicted from an annotation file without label columns."""
    data = str(tmp_path / "odir")
    make_synthetic("odir", data, cases=30, seed=0)
    out = str(tmp_path / "run")
    w = workflow(TRAIN, **train_args(data, out, dataset="odir"))
    w.run()
    w.finalize()
    models = os.path.join(out, "models")
    desc = load_description(models)
    assert desc["data"]["multi_label"] and desc["data"]["activation"] == "sigmoid"
    reference = {}
    w = workflow(TRAIN, **train_args(data, out, dataset="odir", **{"schema#reuse": True}))
    net = w.parser.get_parsed_content("network_def")
    state = torch.load(os.path.join(models, "model.pt"), map_location="cpu", weights_only=True)
    net.load_state_dict(state.get("network", state))
    net.eval()
    with torch.no_grad():
        for item in w.parser.get_parsed_content("test_dataset"):
            reference[item["case_id"]] = torch.sigmoid(net(item["image"][None], item["tabular"][None]))[0].tolist()
    xlsx = os.path.join(data, "ODIR-5K_Training_Annotations(Updated)_V2.xlsx")
    df = pd.read_excel(xlsx)
    df.drop(columns=ODIR_LABELS + [c for c in df.columns if "Keywords" in c]).to_excel(xlsx, index=False)
    cases = inference_cases(desc, "odir", data)
    path = Predictor(
        load_network(models), inference_dataset(desc, cases), desc, str(tmp_path / "pred"), progress=False
    ).run()
    with open(path, newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert set(reference) <= set(rows)
    for case_id, expected in reference.items():
        probs = [float(rows[case_id][f"prob_{c}"]) for c in ODIR_LABELS]
        assert probs == pytest.approx(expected, abs=1e-4), case_id
        assert rows[case_id]["prediction"] == ";".join(c for c, p in zip(ODIR_LABELS, probs) if p >= 0.5)


def test_a_pre_release_description_is_refused_in_one_line(trained, tmp_path):
    """Descriptions of earlier formats (version 1: a builder and a method; version 2: CMMLNet's flat arguments,
    before the input spec and the options were grouped) are refused, naming the way to write them again; nothing
    is migrated."""
    shutil.copy(os.path.join(trained["models"], "model.pt"), tmp_path)
    desc = load_description(trained["models"])
    desc.pop("model_dir")
    flat = {"image_modalities": 2, "image_channels": 3, "spatial_dims": 2, "num_classes": 5, "use_memory": True}
    older = {
        1: {"builder": "cmml_monai.engines.build_network", "args": {"method": "cmml"}},
        2: {**desc["network"], "args": flat},
    }
    for version, network in older.items():
        (tmp_path / DESCRIPTION_NAME).write_text(json.dumps(dict(desc, version=version, network=network)))
        with pytest.raises(
            DataError, match=rf"description version {version}, this package reads 3; write it again: .*describe.json"
        ):
            load_network(str(tmp_path))


def test_a_baseline_is_served_and_completes_nothing(trained, tmp_path):
    """zero_fill (its method overlay): served from its description; missing inputs are not completed."""
    out = str(tmp_path / "zero_fill")
    args = train_args(trained["data"], out)
    w = workflow([TRAIN, os.path.join(ROOT, "configs", "methods", "zero_fill.json")], **args)
    w.run()
    w.finalize()
    models = os.path.join(out, "models")
    desc = load_description(models)
    assert desc["network"]["method"] == "zero_fill" and desc["network"]["args"]["mode"] == "zero_fill"
    assert desc["network"]["target"] == "cmml_monai.networks.LateFusionNet"
    net = load_network(models)
    assert type(net).__name__ == "LateFusionNet" and not completes_missing(net)
    cases = inference_cases(desc, "derm7pt", trained["data"])
    path = Predictor(net, inference_dataset(desc, cases, "test"), desc, str(tmp_path / "pred"), progress=False).run()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r["present"] != "clinic;derm;table" for r in rows)  # some case misses a modality
    assert all(r["completed"] == "" for r in rows)


def test_preflight_lists_a_corrupt_file_or_predicts_without_it(trained, tmp_path):
    data = str(tmp_path / "corrupt")
    shutil.copytree(trained["data"], data)
    desc = load_description(trained["models"])
    cases = inference_cases(desc, "derm7pt", data)
    victim = next(c for c in cases.cases if c.paths["derm"] and c.paths["clinic"] and c.split == "test")
    with open(victim.paths["derm"], "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(DataError, match=r"preflight: 1 problem"):
        inference_dataset(desc, cases, "test", preflight="fail")
    dataset = inference_dataset(desc, cases, "test", preflight="mark_missing")
    path = Predictor(load_network(trained["models"]), dataset, desc, str(tmp_path / "pred"), progress=False).run()
    with open(path, newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert rows[victim.case_id]["present"] == "clinic;table" and rows[victim.case_id]["completed"] == "derm"
    with pytest.raises(DataError, match="no case in split"):
        inference_dataset(desc, cases, "no_such_split")


def test_3d_preprocessing_follows_the_description(tmp_path):
    """MEN layout (3D, resampled to pixdim): the items inference builds from network.json alone equal the
    training items of the same cases, with and without the grade column."""
    data = str(tmp_path / "men")
    make_synthetic("men", data, cases=12, seed=0, shape=(12, 12, 12))
    cases = load_dataset("men", data)
    schema = fit_schema(cases)
    info = DatasetInfo(cases, schema)
    net = LateFusionNet(
        InputSpec(
            image_modalities=info.image_modalities,
            image_channels=info.image_channels,
            spatial_dims=info.spatial_dims,
            num_classes=info.num_classes,
            tabular_cardinalities=info.tabular_cardinalities,
        ),
        feature_dim=8,
        encoder=RESNET10,
        mode="zero_fill",
    )
    models = str(tmp_path / "run" / "models")
    os.makedirs(models)
    torch.save(net.state_dict(), os.path.join(models, "model.pt"))
    save_description(
        str(tmp_path / "run"), net, cases, schema, spatial_size=(8, 8, 8), pixdim=(2.0, 2.0, 2.0), method="zero_fill"
    )
    desc = load_description(models)
    assert desc["preprocessing"]["pixdim"] == [2.0, 2.0, 2.0] and desc["preprocessing"]["mean"] is None
    train_items = build_dataset(cases, None, schema, spatial_size=(8, 8, 8), pixdim=(2.0, 2.0, 2.0))
    expected = {item["case_id"]: item for item in train_items}
    table = os.path.join(data, next(f for f in os.listdir(data) if f.endswith(".csv")))
    pd.read_csv(table).drop(columns=["grade", "split"], errors="ignore").to_csv(table, index=False)
    new = inference_dataset(desc, inference_cases(desc, "men", data))
    assert len(new) == len(expected)
    for item in new:
        want = expected[item["case_id"]]
        assert "label" not in item and item["image"].shape == (4, 8, 8, 8)
        assert torch.equal(item["image"].isnan(), want["image"].isnan())
        assert torch.equal(item["image"].nan_to_num(), want["image"].nan_to_num())
        assert torch.equal(item["tabular"].nan_to_num(), want["tabular"].nan_to_num())
