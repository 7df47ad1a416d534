"""Your own data by manifest (issue #17): a table of cases with paths trains, infers and exports.

The manifest is made from the synthetic MEN layout: NIfTI files of one synthetic set and DICOM series
folders of another, relative and absolute paths, some cells empty. One tiny 3D run of configs/train.json
with the manifest overlay (16^3 voxels, resnet10, d=16, 1 + 1 epochs) is trained once per module.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from cmml_monai.data.adapters import load_dataset
from cmml_monai.data.adapters.manifest import infer_roles, path_kind
from cmml_monai.data.adapters.men import find_sequence
from cmml_monai.data.errors import DataError
from cmml_monai.data.setup import load_cases
from cmml_monai.data.synthetic import make_synthetic
from cmml_monai.data.table import read_table
from cmml_monai.deploy import inference_cases, load_description
from cmml_monai.deploy.description import description_schema
from cmml_monai.deploy.export import main as export_main
from cmml_monai.deploy.inference import unseen_categories

from bundle_helpers import TINY_ARGS, read_predictions, run_bundle, tiny_overrides, workflow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.json")
OVERLAY = os.path.join(ROOT, "configs", "datasets", "manifest.json")
INFERENCE = os.path.join(ROOT, "configs", "inference.json")
EVALUATE = os.path.join(ROOT, "configs", "evaluate.json")
SEQUENCES = ["t1c", "t2w"]
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def _rows(root: str, prefix: str, absolute: bool, base: str) -> list[dict]:
    table = pd.read_csv(os.path.join(root, "clinical.csv"))
    rows = []
    for r in table.to_dict(orient="records"):
        cid = r["case_id"]
        row = {"Case": f"{prefix}{cid}"}
        for s in SEQUENCES:
            p = find_sequence(os.path.join(root, cid), cid, s)
            row[s] = "" if p is None else (p if absolute else os.path.relpath(p, base))
        row.update({"age": r["age"], "sex": r["sex"], "grade": r["grade"]})
        if all(not row[s] for s in SEQUENCES) and pd.isna(r["age"]) and pd.isna(r["sex"]):
            continue  # the synthetic set's one empty case: a manifest row with nothing is refused (tested below)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """``{"manifest", "base", "frame"}``: NIfTI cases with relative paths, DICOM cases with absolute ones."""
    base = str(tmp_path_factory.mktemp("manifest"))
    nii, dcm = os.path.join(base, "nii"), os.path.join(base, "dcm")
    make_synthetic("men", nii, cases=20, seed=0, shape=(12, 12, 12))
    make_synthetic("men", dcm, cases=12, seed=1, shape=(12, 12, 12), dicom=True)
    rows = _rows(nii, "n", False, base) + _rows(dcm, "d", True, base)
    rows[3]["t2w"] = ""  # an empty cell: the modality is missing
    rows[5]["t1c"] = rows[5]["t2w"] = ""  # table only
    frame = pd.DataFrame(rows)
    path = os.path.join(base, "cases.csv")
    frame.to_csv(path, index=False)
    return {"manifest": path, "base": base, "frame": frame}


def _train_args(data: dict, out: str) -> dict:
    return tiny_overrides(
        data["manifest"], out, spatial_size=[16, 16, 16], run_sweep=False, missing_rates=[0.0], num_workers=0
    )


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("manifest_run") / "run")
    w = workflow([TRAIN, OVERLAY], **_train_args(data, out))
    w.run()
    w.finalize()
    return {"out": out, "models": os.path.join(out, "models")}


def _write(frame: pd.DataFrame, path: str, base: str | None = None) -> str:
    """Write ``frame`` to ``path``; with ``base``, its relative paths are made absolute (read from ``base``)."""
    if base is not None:
        frame = frame.copy()
        for col in SEQUENCES:
            frame[col] = [
                p if not isinstance(p, str) or not p or os.path.isabs(p) else os.path.join(base, p) for p in frame[col]
            ]
    frame.to_csv(path, index=False)
    return path


# -- reading --------------------------------------------------------------------------------------------


def test_roles_are_inferred_and_cases_read(data):
    roles = infer_roles(read_table(data["manifest"]), data["base"])
    assert roles.id_column == "Case" and roles.image_columns == {"t1c": "t1c", "t2w": "t2w"}
    assert roles.label_columns == ["grade"] and roles.table_columns == ["age", "sex"]
    assert roles.split_column is None and roles.image_kind == "image3d"
    cases = load_dataset("manifest", data["manifest"])
    assert cases.modality_names == ["t1c", "t2w", "table"] and cases.class_names == ["1", "2", "3"]
    assert {m.channels for m in cases.image_modalities} == {1}
    by_id = {c.case_id: c for c in cases.cases}
    dicom_case = next(c for c in cases.cases if c.case_id.startswith("d") and c.paths["t1c"])
    assert os.path.isdir(dicom_case.paths["t1c"])  # a DICOM series folder
    assert by_id[data["frame"]["Case"][3]].paths["t2w"] is None
    assert {c.split for c in cases.cases} == {"train", "valid", "test"}
    assert path_kind("a/b.PNG") == "image2d" and path_kind("x.nii") == "image3d" and path_kind("male") is None


def test_2d_xlsx_manifest_with_label_columns(tmp_path):
    """Photos (Derm7pt layout) listed in an Excel manifest in the image folder, two 0/1 label columns."""
    root = str(tmp_path / "derm")
    make_synthetic("derm7pt", root, cases=20, seed=0)
    meta = pd.read_csv(os.path.join(root, "release_v0", "meta", "meta.csv"))
    frame = pd.DataFrame(
        {
            "ID": meta["case_num"],
            "clinic": meta["clinic"],
            "derm": meta["derm"],
            "sex": meta["sex"],
            "melanoma": meta["diagnosis"].str.startswith("melanoma").astype(int),
            "nevus": meta["diagnosis"].str.contains("nevus").astype(int),
        }
    )
    images = os.path.join(root, "release_v0", "images")
    frame.to_excel(os.path.join(images, "cases.xlsx"), index=False)
    # the synthetic set lists some files it did not write: a manifest names them as errors, all at once
    with pytest.raises(DataError, match=r"cases\.xlsx: \d+ path\(s\) do not exist"):
        load_dataset("manifest", images, label_columns=["melanoma", "nevus"])
    for col in ("clinic", "derm"):
        frame[col] = [p if os.path.isfile(os.path.join(images, p)) else None for p in frame[col]]
    frame.loc[0, "clinic"] = None
    frame = frame[frame[["clinic", "derm", "sex"]].notna().any(axis=1)]  # rows with nothing are refused
    frame.to_excel(os.path.join(images, "cases.xlsx"), index=False)
    cases = load_dataset("manifest", images, label_columns=["melanoma", "nevus"], table_columns=["sex"])
    assert cases.multi_label and cases.class_names == ["melanoma", "nevus"]
    assert [(m.name, m.kind, m.channels) for m in cases.image_modalities] == [
        ("clinic", "image2d", 3),
        ("derm", "image2d", 3),
    ]
    first = cases.cases[0]
    assert first.case_id == "1" and first.paths["clinic"] is None and first.missing_reason["clinic"] == "no file listed"
    assert all(set(c.label) <= {0, 1} and len(c.label) == 2 for c in cases.cases)
    renamed = load_dataset(
        "manifest", images, label_columns=["melanoma", "nevus"], image_columns={"photo": "clinic", "dermoscopy": "derm"}
    )
    assert renamed.modality_names == ["photo", "dermoscopy", "table"] and renamed.table_columns == ["sex"]
    with pytest.raises(DataError, match="no synthetic stand-in.*--synthetic false"):
        load_cases("manifest", images, synthetic=True)


def test_split_column_and_saved_split(data, tmp_path):
    split_file = str(tmp_path / "split.json")
    made = load_dataset("manifest", data["manifest"], split_file=split_file)
    saved = json.load(open(split_file))["splits"]
    assert saved == {c.case_id: c.split for c in made.cases}
    again = load_dataset("manifest", data["manifest"], split_file=split_file, split_seed=5)  # reused, not remade
    assert {c.case_id: c.split for c in again.cases} == saved
    frame = data["frame"].assign(fold=["train"] * 10 + ["val"] * 5 + ["test"] * (len(data["frame"]) - 15))
    path = _write(frame, str(tmp_path / "with_split.csv"), data["base"])
    cases = load_dataset("manifest", path, split_column="fold", table_types={"age": "numeric"})
    assert [c.split for c in cases.cases][9:11] == ["train", "valid"] and cases.table_types == {"age": "numeric"}


def test_trains_infers_and_exports(trained, data, tmp_path):
    desc = load_description(trained["models"])
    assert desc["data"]["dataset"] == "manifest"
    assert [m["name"] for m in desc["data"]["modalities"]] == ["t1c", "t2w", "table"]
    assert desc["inputs"]["image"] == [2, 16, 16, 16]
    shared = os.path.join(trained["out"], "shared")
    assert any(f == "manifest_split.json" for _, _, files in os.walk(shared) for f in files)
    # new cases: no grade, another folder, an image-only case, an unseen category
    new = data["frame"].drop(columns=["grade"]).iloc[:6].copy()
    new.loc[new.index[0], ["age", "sex"]] = [None, None]
    new.loc[new.index[1], "sex"] = "unknown-sex"
    new.loc[new.index[2], "sex"] = "unknown-sex"
    work = tmp_path / "elsewhere"
    work.mkdir()
    manifest = _write(new, str(work / "new_cases.csv"), data["base"])
    pred = str(tmp_path / "pred")
    done = run_bundle(
        INFERENCE,
        ROOT,
        "--model_dir",
        trained["models"],
        "--dataset_dir",
        manifest,
        "--output_dir",
        pred,
        "--preflight",
        "off",
        cwd=str(work),
        env=ENV,
        stderr=subprocess.STDOUT,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    rows = read_predictions(pred)
    assert sorted(rows) == sorted(new["Case"])
    first = rows[new["Case"].iloc[0]]
    assert "table" not in first["present"].split(";") and "table" in first["completed"].split(";")
    table_only = rows[new["Case"].iloc[5]]
    assert table_only["present"] == "table" and table_only["completed"] == "t1c;t2w"
    # the unseen category is said once (one line for the column, not one per case) and encoded as missing
    said = [line for line in done.stdout.splitlines() if "unknown-sex" in line]
    assert len(said) == 1 and "encoded as missing" in said[0], done.stdout[-2000:]
    assert os.path.isfile(os.path.join(pred, "cases", f"{new['Case'].iloc[1]}.json"))
    # export: TorchScript matches eager on every missing pattern of t1c, t2w, table
    assert export_main([trained["models"], "--out", str(tmp_path / "model.ts")]) == 0
    assert os.path.getsize(tmp_path / "model.ts") > 0


def test_evaluates_like_the_native_adapters(trained, data):
    w = workflow([TRAIN, OVERLAY, EVALUATE], **{**_train_args(data, trained["out"]), "sweep#subsets": True})
    w.run()
    w.finalize()
    with open(os.path.join(trained["out"], "eval", "sweep.csv"), newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["rate"]) == 0.0 and 0.0 <= float(row["auc"]) <= 1.0
    with open(os.path.join(trained["out"], "eval", "subsets.csv"), newline="") as f:
        assert [r["subset"] for r in csv.DictReader(f)][0] == "t1c+t2w+table"  # 2^3 - 1 subsets


@pytest.mark.e2e
def test_readme_recipe_trains_from_the_command_line(data, tmp_path):
    """README / docs/datasets.md "Your own data": the overlay with roles set on the command line, from a fresh cwd."""
    tiny = [*TINY_ARGS, "--missing_rates", "[0.0]", "--sweep#subsets", "false", "--sweep#roc", "false"]
    done = run_bundle(
        repr([TRAIN, OVERLAY]),
        None,
        "--dataset_dir",
        data["manifest"],
        "--spatial_size",
        "[16,16,16]",
        "--dataset_options#image_columns",
        "['t1c','t2w']",
        "--dataset_options#label_columns",
        "grade",
        *tiny,
        cwd=str(tmp_path),
        env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    desc = load_description(str(tmp_path / "outputs" / "manifest_cmml" / "models"))
    assert desc["data"]["dataset_options"]["image_columns"] == ["t1c", "t2w"]
    (shared,) = os.listdir(tmp_path / "outputs" / "shared")
    assert shared.startswith("manifest-")  # the made split is saved beside the masks
    assert "manifest_split.json" in os.listdir(tmp_path / "outputs" / "shared" / shared)


def test_unseen_category_is_listed(trained, data, tmp_path):
    desc = load_description(trained["models"])
    new = data["frame"].drop(columns=["grade"]).iloc[:3].assign(sex=["male", "other", "other"])
    cases = inference_cases(desc, "manifest", _write(new, str(tmp_path / "n.csv"), data["base"]))
    assert unseen_categories(description_schema(desc), cases) == {"sex": ["other"]}


# -- bad input: one clear line ---------------------------------------------------------------------------


def test_bad_manifests(data, tmp_path):
    frame, path = data["frame"], data["manifest"]
    with pytest.raises(DataError, match=r"column 'sexx' given as table_columns .*did you mean 'sex'"):
        load_dataset("manifest", path, table_columns=["age", "sexx"])
    with pytest.raises(DataError, match=r"column 'Diagnosis' given as label_columns"):
        load_dataset("manifest", path, label_columns="Diagnosis")
    no_label = _write(frame.drop(columns=["grade"]), str(tmp_path / "no_label.csv"), data["base"])
    with pytest.raises(DataError, match="no label column found"):
        load_dataset("manifest", no_label)
    gone = frame.copy()
    gone.loc[2, "t1c"] = "nii/nowhere/t1c.nii.gz"
    with pytest.raises(DataError, match=r"1 path\(s\) do not exist, e\.g\. case .* column 't1c'.*nowhere"):
        load_dataset("manifest", _write(gone, os.path.join(data["base"], "gone.csv")))
    moved = frame.copy()  # a DICOM series folder that is not there (no suffix to tell it is an image path)
    dicom_row = next(i for i, p in enumerate(frame["t1c"]) if isinstance(p, str) and os.path.isabs(p))
    moved.loc[dicom_row, "t1c"] = os.path.join(data["base"], "elsewhere", "t1c")
    with pytest.raises(DataError, match=r"1 path\(s\) do not exist, e\.g\. .*column 't1c': .*elsewhere"):
        load_dataset("manifest", _write(moved, os.path.join(data["base"], "moved.csv")))
    empty = frame.copy()
    empty.loc[4, ["t1c", "t2w", "age", "sex"]] = [None, None, None, None]
    with pytest.raises(DataError, match=rf"1 case\(s\) have no modality at all.*{frame['Case'][4]}"):
        load_dataset("manifest", _write(empty, str(tmp_path / "empty.csv"), data["base"]))
    mixed = frame.copy()
    mixed.loc[1, "t1c"] = "photo.jpg"
    with pytest.raises(DataError, match="mixes 2D images"):
        load_dataset("manifest", _write(mixed, str(tmp_path / "mixed.csv"), data["base"]))
    with pytest.raises(DataError, match="both label_columns and table_columns|both table_columns and label_columns"):
        load_dataset("manifest", path, table_columns=["age", "grade"])
    with pytest.raises(DataError, match=r"label '3' .* not one of class_names"):
        load_dataset("manifest", path, class_names=[1, 2])
    bad_split = frame.assign(split="holdout")
    with pytest.raises(DataError, match="split 'holdout'"):
        load_dataset("manifest", _write(bad_split, str(tmp_path / "split.csv"), data["base"]))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("manifest", str(tmp_path / "no_such_folder"))


def test_inspect_data_prints_the_inferred_roles(data):
    script = os.path.join(ROOT, "scripts", "inspect_data.py")
    done = subprocess.run(
        [sys.executable, script, "--dataset", "manifest", "--dataset_dir", data["manifest"]],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "column roles" in done.stdout and '"image_columns": {"t1c": "t1c", "t2w": "t2w"}' in done.stdout
    bad = subprocess.run(
        [
            sys.executable,
            script,
            "--dataset",
            "manifest",
            "--dataset_dir",
            data["manifest"],
            "--table_columns",
            '["sexx"]',
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert bad.returncode == 2 and len(errors) == 1 and "did you mean 'sex'" in errors[0]
    assert "Traceback" not in bad.stderr
