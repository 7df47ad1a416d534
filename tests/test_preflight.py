"""Preflight: every file of every split is checked before the first epoch, all problems listed at once."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from cmml_monai.data.adapters import load_dataset
from cmml_monai.data.cases import Case, CaseList, ModalitySpec
from cmml_monai.data.dataset import build_dataset
from cmml_monai.data.errors import DataError, find_data_error
from cmml_monai.data.preflight import run_preflight
from cmml_monai.data.table import TableSchema

from bundle_helpers import SMALL_SIZES, run_bundle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "configs", "train.json")
EVALUATE = os.path.join(ROOT, "configs", "evaluate.json")
SIZE = (16, 16)
SPLITS = ("train", "valid", "test")


def _jpeg(path, seed: int) -> str:
    arr = np.random.default_rng(seed).integers(0, 256, size=(24, 32, 3)).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=90)
    return str(path)


def _truncate(path: str) -> None:
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])


@pytest.fixture
def cases(tmp_path):
    """Nine 2D cases, three per split, both images present, a table."""
    out = []
    for i in range(9):
        paths = {m: _jpeg(tmp_path / f"c{i}_{m}.jpg", 2 * i + j) for j, m in enumerate(("clinic", "derm"))}
        out.append(Case(f"c{i}", SPLITS[i % 3], paths, label=i % 2, table={"sex": "fm"[i % 2]}))
    mods = [ModalitySpec("clinic", "image2d", 3), ModalitySpec("derm", "image2d", 3), ModalitySpec("table", "table")]
    case_list = CaseList("toy", mods, ["a", "b"], False, ["sex"], out)
    schema = TableSchema.fit([c.table for c in case_list.split("train")], ["sex"], {"sex": "categorical"})
    return case_list, schema


def _datasets(case_list, schema, cache, tmp_path):
    return {
        s: build_dataset(
            case_list, s, schema, spatial_size=SIZE, cache=cache, cache_dir=tmp_path / "cache", defer_errors=True
        )
        for s in SPLITS
    }


@pytest.mark.parametrize("cache", ["cache", "none", "persistent"])
def test_all_problems_listed_at_once_before_training(cases, cache, tmp_path):
    case_list, schema = cases
    test_case, valid_case = case_list.split("test")[0], case_list.split("valid")[1]
    _truncate(test_case.paths["derm"])
    open(valid_case.paths["clinic"], "wb").close()  # zero bytes
    datasets = _datasets(case_list, schema, cache, tmp_path)  # the in-memory cache fill does not stop
    out = tmp_path / "run"
    with pytest.raises(DataError) as raised:
        run_preflight(case_list, datasets, "fail", num_workers=2, output_dir=out, progress=False)
    msg = str(raised.value)
    head, *lines = msg.splitlines()
    assert head.startswith("preflight: 2 problem(s) in 2 case(s) of 9 checked") and "mark_missing" in head
    assert len(lines) == 2
    assert any(f"[test] case {test_case.case_id}, modality derm: {test_case.paths['derm']}" in x for x in lines)
    assert any(f"[valid] case {valid_case.case_id}, modality clinic: {valid_case.paths['clinic']}" in x for x in lines)
    assert all("replace it or mark the modality missing" in x for x in lines)
    report = json.loads((out / "preflight.json").read_text())
    assert {(p["split"], p["case_id"], p["modality"]) for p in report["problems"]} == {
        ("test", test_case.case_id, "derm"),
        ("valid", valid_case.case_id, "clinic"),
    }
    assert not glob.glob(str(out / ".tmp-*"))


def test_cached_dataset_is_not_decoded_again(cases, tmp_path):
    """With cache="cache" the cache fill is the check: the preflight reopens no file."""
    case_list, schema = cases
    # an uncached dataset is decoded by the preflight itself, once per item
    uncached = {"train": build_dataset(case_list, "train", schema, spatial_size=SIZE)}
    assert run_preflight(case_list, uncached, "fail", progress=False).checked == 3
    datasets = _datasets(case_list, schema, "cache", tmp_path)
    for c in case_list.cases:  # every file gone after the fill: a preflight that decoded would fail
        for p in c.paths.values():
            os.remove(p)
    report = run_preflight(case_list, datasets, "fail", progress=False)
    assert report.problems == [] and report.items == 9 and report.checked == 0
    assert not torch.isnan(datasets["test"][0]["image"]).any()  # training reads the cache


def test_persistent_cache_filled_by_preflight(cases, tmp_path):
    case_list, schema = cases
    datasets = _datasets(case_list, schema, "persistent", tmp_path)
    assert not glob.glob(str(tmp_path / "cache" / "*" / "*.pt"))
    report = run_preflight(case_list, datasets, "fail", progress=False)
    assert report.checked == 9 and len(glob.glob(str(tmp_path / "cache" / "*" / "*.pt"))) == 9


@pytest.mark.parametrize("cache", ["cache", "none", "persistent"])
def test_mark_missing_goes_on_without_the_bad_modality(cases, cache, tmp_path):
    case_list, schema = cases
    bad = case_list.split("test")[2]
    path = bad.paths["clinic"]
    _truncate(path)
    datasets = _datasets(case_list, schema, cache, tmp_path)
    report = run_preflight(case_list, datasets, "mark_missing", output_dir=tmp_path, progress=False)
    assert report.marked_missing == [("test", bad.case_id, "clinic")]
    assert bad.paths["clinic"] is None and bad.missing_reason["clinic"].startswith("preflight: case")
    assert path in bad.missing_reason["clinic"]
    item = datasets["test"][2]
    assert item["case_id"] == bad.case_id
    assert torch.isnan(item["image"][:3]).all() and not torch.isnan(item["image"][3:]).any()
    assert len(json.loads((tmp_path / "preflight.json").read_text())["marked_missing"]) == 1


def test_mark_missing_still_stops_on_a_case_without_any_usable_modality(tmp_path):
    paths = {"clinic": _jpeg(tmp_path / "a.jpg", 0), "derm": _jpeg(tmp_path / "b.jpg", 1)}
    good = {"clinic": _jpeg(tmp_path / "c.jpg", 2), "derm": _jpeg(tmp_path / "d.jpg", 3)}
    mods = [ModalitySpec("clinic", "image2d", 3), ModalitySpec("derm", "image2d", 3)]
    two = [Case("x", "train", paths, 0), Case("y", "train", good, 1)]
    case_list = CaseList("toy", mods, ["a", "b"], False, [], two)
    _truncate(paths["clinic"])
    open(paths["derm"], "wb").close()
    ds = {"train": build_dataset(case_list, "train", None, spatial_size=SIZE, cache="cache", defer_errors=True)}
    with pytest.raises(DataError, match=r"(?s)cannot be marked missing.*case x: no usable modality is left"):
        run_preflight(case_list, ds, "mark_missing", progress=False)


def test_off_checks_nothing_and_bad_mode_is_named(cases):
    case_list, schema = cases
    _truncate(case_list.split("test")[0].paths["derm"])
    ds = {"test": build_dataset(case_list, "test", schema, spatial_size=SIZE)}
    assert run_preflight(case_list, ds, "off").problems == []
    with pytest.raises(DataError, match="preflight must be one of .* got 'strict'"):
        run_preflight(case_list, ds, "strict")


def test_cache_without_deferred_errors_still_raises_the_first(cases):
    case_list, schema = cases
    _truncate(case_list.split("train")[0].paths["derm"])
    with pytest.raises(DataError, match="case c0, modality derm"):
        build_dataset(case_list, "train", schema, spatial_size=SIZE, cache="cache")
    ds = build_dataset(case_list, "train", schema, spatial_size=SIZE, cache="cache", defer_errors=True)
    assert list(ds.load_errors) == [0]
    with pytest.raises(DataError, match="case c0, modality derm"):  # read later: the error, not a None item
        ds[0]


def test_deferred_errors_with_augmentation_and_a_bounded_cache(cases):
    """A bad cached item is recorded and raises when read (the augmentation never sees it); a bad item past
    the cache bound is not recorded (the preflight decodes it) and raises its error when read."""
    from cmml_monai.data.augmentation import build_augmentation
    from cmml_monai.data.dataset import item_nbytes

    case_list, schema = cases
    train = case_list.split("train")
    _truncate(train[0].paths["derm"])
    _truncate(train[2].paths["derm"])
    ds = build_dataset(
        case_list,
        "train",
        schema,
        spatial_size=SIZE,
        cache="cache",
        defer_errors=True,
        augment=build_augmentation([3, 3], 2, "default", seed=0),
        cache_max_gb=2.5 * item_nbytes(case_list, SIZE) / 1e9,
    )
    assert ds.cache_num == 2 and list(ds.load_errors) == [0]
    assert ds[1]["image"].shape == (6, *SIZE)
    for index, case in ((0, train[0]), (2, train[2]), (-3, train[0])):
        with pytest.raises(DataError, match=f"case {case.case_id}, modality derm"):
            ds[index]


def test_reload_recomputes_the_cached_item_and_keeps_the_cache_unshared(cases):
    case_list, schema = cases
    train = case_list.split("train")
    good = os.path.join(os.path.dirname(train[0].paths["derm"]), "good.jpg")
    shutil.copy(train[0].paths["derm"], good)
    _truncate(train[0].paths["derm"])
    ds = build_dataset(case_list, "train", schema, spatial_size=SIZE, cache="cache", defer_errors=True)
    assert list(ds.load_errors) == [0]
    # a good cached item changed in the data: the cache serves the old item until reloaded
    ds.data[1]["clinic"] = None
    assert not ds[1]["image"].isnan().any()
    ds.reload(1)
    assert ds[1]["image"][:3].isnan().all() and not ds[1]["image"][3:].isnan().any()
    # the bad item, marked missing and reloaded: no longer an error
    ds.data[0]["derm"] = None
    ds.reload(0)
    assert ds.load_errors == {}
    item = ds[0]
    assert item["image"][3:].isnan().all() and not item["image"][:3].isnan().any()
    item.pop("label")  # a consumer changing a recomputed item leaves it intact
    assert "label" in ds[0]
    # a bad file replaced after the fill is decoded again when read
    ds2 = build_dataset(case_list, "train", schema, spatial_size=SIZE, cache="cache", defer_errors=True)
    assert list(ds2.load_errors) == [0]
    shutil.copy(good, train[0].paths["derm"])
    assert not ds2[0]["image"].isnan().any()


# ------------------------------------------------------------------------------------------ bundle
@pytest.fixture(scope="module")
def truncated_test_jpeg(tmp_path_factory):
    """A Derm7pt-layout synthetic folder with one truncated JPEG in the test split (the motivating bug)."""
    from cmml_monai.data.synthetic import make_synthetic

    root = str(tmp_path_factory.mktemp("pf") / "derm7pt")
    make_synthetic("derm7pt", root, cases=30, seed=0)
    victim = next(c for c in load_dataset("derm7pt", root).split("test") if c.paths["derm"])
    _truncate(victim.paths["derm"])
    return root, victim


def _tiny(root: str, out: str) -> list[str]:
    args = {
        "dataset_dir": root,
        "synthetic": False,
        "output_dir": out,
        "shared_dir": os.path.join(out, "shared"),
        **SMALL_SIZES,
        "mlflow_enabled": False,
        "missing_rates": [0.0],
    }
    return [x for k, v in args.items() for x in (f"--{k}", json.dumps(v) if not isinstance(v, str) else v)]


def test_bundle_stops_before_training_naming_the_truncated_test_jpeg(truncated_test_jpeg, tmp_path):
    root, victim = truncated_test_jpeg
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "CMML_TRACEBACK"}
    proc = run_bundle(TRAIN, ROOT, *_tiny(root, str(out)), timeout=300, env=env)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: preflight: 1 problem(s) in 1 case(s)" in proc.stderr
    assert f"[test] case {victim.case_id}, modality derm: {victim.paths['derm']}" in proc.stderr
    assert "Truncated" in proc.stderr or "truncated" in proc.stderr
    assert not (out / "stage1").exists() and not (out / "stage2").exists() and not (out / "models").exists()
    assert not list(out.rglob("*.pt"))
    assert (out / "preflight.json").is_file()


def test_bundle_mark_missing_trains_without_the_bad_file(truncated_test_jpeg, tmp_path):
    root, victim = truncated_test_jpeg
    out = str(tmp_path / "run")
    args = dict(zip(_tiny(root, out)[::2], _tiny(root, out)[1::2]))
    over = {k[2:]: json.loads(v) if v[:1] in "[{0123456789tf" else v for k, v in args.items()}
    over.update(preflight="mark_missing", stage2_epochs=0, run_sweep=False, bundle_root=ROOT)
    w = ConfigWorkflow(config_file=TRAIN, workflow_type="train", **over)
    w.initialize()
    w.run()
    case = next(c for c in w.parser.get_parsed_content("case_list").cases if c.case_id == victim.case_id)
    assert case.paths["derm"] is None and "truncated" in case.missing_reason["derm"].lower()
    assert os.path.isfile(os.path.join(out, "models", "model.pt"))


def test_evaluate_checks_the_test_split_first(truncated_test_jpeg, tmp_path):
    root, victim = truncated_test_jpeg
    out = str(tmp_path / "eval_run")
    over = dict(
        dataset_dir=root,
        synthetic=False,
        output_dir=out,
        shared_dir=os.path.join(out, "shared"),
        spatial_size=[32, 32],
        feature_dim=16,
        progress_bar=False,
        mlflow_enabled=False,
        bundle_root=ROOT,
    )
    w = ConfigWorkflow(config_file=[TRAIN, EVALUATE], workflow_type="train", **over)
    w.initialize()
    with pytest.raises(Exception) as raised:  # no model.pt exists: the preflight's error comes first
        w.run()
    err = find_data_error(raised.value)
    assert err is not None and str(err).startswith("preflight: 1 problem(s)") and victim.paths["derm"] in str(err)
    shutil.rmtree(out, ignore_errors=True)
