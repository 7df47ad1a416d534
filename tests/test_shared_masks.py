"""Masks and splits bound to their data: a case fingerprint in every file and in the default shared_dir."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from monai.bundle import ConfigWorkflow

from cmml_monai.data.adapters import load_dataset
from cmml_monai.data.adapters.splits import load_or_make_split
from cmml_monai.data.errors import DataError, find_data_error
from cmml_monai.data.fingerprint import case_fingerprint, fingerprint_of
from cmml_monai.data.missingness import ensure_masks, simulate_presence

from bundle_helpers import ROOT, SMALL_SIZES, TRAIN


def _run(bundle_root: str, dataset_dir: str, cases: int, method: str = "cmml", **extra) -> ConfigWorkflow:
    """train.json from a working directory ``bundle_root`` (outputs/ and the default shared_dir go there)."""
    args = dict(
        bundle_root=bundle_root,
        dataset_dir=dataset_dir,
        synthetic_cases=cases,
        method=method,
        **SMALL_SIZES,
        missing_rates=[0.0, 0.5],
        mlflow_enabled=False,
        **{"sweep#subsets": False, "sweep#roc": False},
    )
    args.update(extra)
    overlay = os.path.join(ROOT, "configs", "methods", f"{method}.json")
    w = ConfigWorkflow(config_file=[TRAIN, overlay], workflow_type="train", **args)
    w.initialize()
    return w


def _shared_folders(root) -> list[str]:
    return sorted(os.listdir(os.path.join(str(root), "outputs", "shared")))


def test_fingerprint_changes_with_cases_kind_and_modalities_only():
    fp = case_fingerprint("derm7pt", ["clinic", "derm", "table"], ["b", "a"])
    assert fp == case_fingerprint("derm7pt", ["clinic", "derm", "table"], ["a", "b"])  # order of cases: same data
    assert (
        len(
            {
                fp,
                case_fingerprint("derm7pt", ["clinic", "derm", "table"], ["a", "c"]),
                case_fingerprint("odir", ["clinic", "derm", "table"], ["a", "b"]),
                case_fingerprint("derm7pt", ["clinic", "derm"], ["a", "b"]),
            }
        )
        == 4
    )


def test_second_dataset_of_the_same_kind_from_the_same_directory(tmp_path):
    """The reproduction of issue #19: a second synthetic Derm7pt trained from the same working
    directory used to stop on the first one's masks_valid.json; now each dataset has its own masks
    folder and a second method on the first dataset reuses the first folder's masks. (A run's
    output_dir stays one per dataset and method: the second dataset needs its own.)"""
    work = tmp_path / "work"
    first = _run(str(work), str(tmp_path / "a"), 30)
    first.run()
    first.finalize()
    (folder_a,) = _shared_folders(work)
    fp_a = fingerprint_of(first.parser.get_parsed_content("case_list"))
    assert folder_a == f"derm7pt-{fp_a[:12]}"
    masks_a = {
        name: (work / "outputs" / "shared" / folder_a / name).read_text()
        for name in ("masks_valid.json", "masks_test.json")
    }
    assert all(json.loads(text)["fingerprint"] == fp_a for text in masks_a.values())

    # the second dataset in the first one's output_dir would resume its checkpoints: refused before
    # anything is written there
    schema = work / "outputs" / "derm7pt_cmml" / "table_schema.json"
    schema_a = schema.read_text()
    with pytest.raises(Exception) as info:
        _run(str(work), str(tmp_path / "b"), 24)
    err = find_data_error(info.value)
    assert err is not None, info.value
    assert str(err).startswith(str(work / "outputs" / "derm7pt_cmml") + ": holds a run trained on another dataset")
    assert "--output_dir" in str(err) and "\n" not in str(err)
    assert schema.read_text() == schema_a

    second = _run(str(work), str(tmp_path / "b"), 24, output_dir=str(work / "outputs" / "derm7pt_b_cmml"))
    second.run()
    second.finalize()
    fp_b = fingerprint_of(second.parser.get_parsed_content("case_list"))
    assert fp_b != fp_a and _shared_folders(work) == sorted([folder_a, f"derm7pt-{fp_b[:12]}"])

    # another method and seed on the first dataset: the same folder, the masks untouched
    third = _run(str(work), str(tmp_path / "a"), 30, method="zero_fill", seed=1)
    third.run()
    third.finalize()
    assert len(_shared_folders(work)) == 2
    for name, text in masks_a.items():
        assert (work / "outputs" / "shared" / folder_a / name).read_text() == text, name


def test_explicit_shared_dir_with_another_datasets_masks_stops_with_one_line(tmp_path):
    shared = str(tmp_path / "shared")
    first = _run(str(tmp_path), str(tmp_path / "a"), 30, shared_dir=shared, output_dir=str(tmp_path / "run_a"))
    first.parser.get_parsed_content("val_views")
    masks_file = os.path.join(shared, "masks_valid.json")
    assert os.path.isfile(masks_file)
    other = _run(str(tmp_path), str(tmp_path / "b"), 24, shared_dir=shared, output_dir=str(tmp_path / "run_b"))
    with pytest.raises(Exception) as info:
        other.parser.get_parsed_content("val_views")
    err = find_data_error(info.value)
    assert err is not None, info.value
    message = str(err)
    assert "\n" not in message and message.startswith(masks_file)
    assert "belong to another dataset (derm7pt" in message and "--shared_dir" in message


def test_mask_file_of_another_dataset_is_refused_even_with_the_same_ids(tmp_path):
    """Same case ids in the split, other data around them (another fingerprint): refused."""
    natural = simulate_presence(np.ones((3, 2), bool), 0.0)
    path = tmp_path / "masks_test.json"
    ensure_masks(path, ["a", "b", "c"], ["x", "y"], natural, (0.0,), 0, fingerprint="1" * 64, dataset="odir")
    assert ensure_masks(path, ["a", "b", "c"], ["x", "y"], natural, (0.0,), 0, fingerprint="1" * 64)
    with pytest.raises(DataError, match="another dataset \\(odir, cases fingerprint 111111111111\\)"):
        ensure_masks(path, ["a", "b", "c"], ["x", "y"], natural, (0.0,), 0, fingerprint="2" * 64)


def test_split_file_carries_the_fingerprint_and_its_folder(synthetic_dataset, tmp_path):
    root, _ = synthetic_dataset("odir", 40)
    template = str(tmp_path / "shared" / "odir-{fingerprint}" / "odir_split.json")
    cl = load_dataset("odir", root, split_file=template)
    fp = fingerprint_of(cl)
    path = tmp_path / "shared" / f"odir-{fp[:12]}" / "odir_split.json"
    saved = json.loads(path.read_text())
    assert saved["fingerprint"] == fp and saved["dataset"] == "odir"
    assert {c.case_id: c.split for c in cl.cases} == saved["splits"]
    # the same data again: the saved split is reused (a new seed does not change it)
    again = load_dataset("odir", root, split_file=template, split_seed=5)
    assert {c.case_id: c.split for c in again.cases} == saved["splits"]
    # a split file made for other cases (even ones it covers) is refused with one line
    ids = [c.case_id for c in cl.cases]
    with pytest.raises(DataError, match=f"^{path}: these splits belong to another dataset \\(odir"):
        load_or_make_split(
            ids[:-1],
            ["0"] * (len(ids) - 1),
            str(path),
            fingerprint=case_fingerprint("odir", cl.modality_names, ids[:-1]),
        )
