"""The case fingerprint covers the split that comes with the data: two datasets with the same case ids and
other splits get their own shared folder (issue #31), and unlabelled cases raise no class-balance warning."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from cmml_monai.data.adapters import load_dataset
from cmml_monai.data.fingerprint import fingerprint_of, ids_fingerprint_of
from cmml_monai.data.preflight import class_coverage
from cmml_monai.data.synthetic import make_synthetic

from test_shared_masks import _run, _shared_folders


def _derm_pair(tmp_path, cases: int = 30) -> tuple[str, str]:
    """Two synthetic Derm7pt draws: the same ids 1..cases, other splits."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_synthetic("derm7pt", a, cases=cases, seed=0)
    make_synthetic("derm7pt", b, cases=cases, seed=1)
    return a, b


def test_fingerprint_covers_the_split_from_the_data(tmp_path):
    a, b = _derm_pair(tmp_path)
    first, second = load_dataset("derm7pt", a), load_dataset("derm7pt", b)
    assert sorted(c.case_id for c in first.cases) == sorted(c.case_id for c in second.cases)
    assert {c.case_id: c.split for c in first.cases} != {c.case_id: c.split for c in second.cases}
    assert ids_fingerprint_of(first) == ids_fingerprint_of(second)  # what the fingerprint used to see
    assert fingerprint_of(first) != fingerprint_of(second)
    assert fingerprint_of(first) == fingerprint_of(load_dataset("derm7pt", a))  # stable for one dataset


def test_split_made_by_the_project_keeps_the_ids_fingerprint(tmp_path):
    root = str(tmp_path / "odir")
    make_synthetic("odir", root, cases=40, seed=0)
    cl = load_dataset("odir", root, split_file=str(tmp_path / "shared" / "odir-{fingerprint}" / "odir_split.json"))
    assert cl.split_made and fingerprint_of(cl) == ids_fingerprint_of(cl)  # the split file's folder


def test_unlabelled_cases_raise_no_class_balance_warning(tmp_path):
    a, _ = _derm_pair(tmp_path, cases=15)
    cl = load_dataset("derm7pt", a)
    for c in cl.cases:
        c.label = None  # new cases read for inference
    assert class_coverage(cl, ["train", "valid", "test"]) == []
    labelled = load_dataset("derm7pt", a)
    for c in labelled.split("valid"):
        c.label = 0
    assert class_coverage(labelled, ["valid"])[0].startswith("valid split: no case of class(es)")


@pytest.mark.slow
def test_same_ids_other_splits_train_one_after_the_other_in_one_working_directory(tmp_path):
    a, b = _derm_pair(tmp_path)
    work = str(tmp_path / "work")
    first = _run(work, a, 30)
    first.run()
    first.finalize()
    # the second dataset in its own output_dir, the default shared_dir: it used to stop on the first one's masks
    second = _run(work, b, 30, synthetic_seed=1, output_dir=os.path.join(work, "outputs", "derm7pt_b_cmml"))
    second.run()
    second.finalize()
    folders = _shared_folders(work)
    assert len(folders) == 2 and all(f.startswith("derm7pt-") for f in folders)
    assert os.path.isfile(os.path.join(work, "outputs", "derm7pt_b_cmml", "dataset_fingerprint.json"))
    assert not pd.isna(
        pd.read_json(os.path.join(work, "outputs", "derm7pt_b_cmml", "dataset_fingerprint.json"), typ="series")[
            "fingerprint"
        ]
    )
