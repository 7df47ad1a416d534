"""Bad input through the bundle entry point gives one ``error: ...`` line, not a library traceback."""

from __future__ import annotations

import os

import pytest

from cmml_monai.data.errors import DataError, find_data_error

from bundle_helpers import run_bundle


def test_find_data_error_walks_the_wrapping_chain():
    try:
        try:
            raise DataError("meta.csv: column 'diagnosis' is missing")
        except DataError as inner:
            raise RuntimeError("Failed to instantiate component") from inner
    except RuntimeError as outer:
        found = find_data_error(outer)
    assert isinstance(found, DataError) and "diagnosis" in str(found)
    assert find_data_error(RuntimeError("other")) is None


@pytest.mark.parametrize("show_traceback", [False, True])
def test_bundle_run_with_missing_dataset_dir_prints_one_line(tmp_path, show_traceback):
    env = {k: v for k, v in os.environ.items() if k != "CMML_TRACEBACK"}
    if show_traceback:
        env["CMML_TRACEBACK"] = "1"
    missing = tmp_path / "no_such_release_v0"
    proc = run_bundle(
        "['configs/train.json','configs/datasets/derm7pt.json']",
        str(tmp_path),
        "--dataset_dir",
        str(missing),
        "--mlflow_enabled",
        "false",
        timeout=300,
        env=env,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert str(missing) in proc.stderr and "does not exist" in proc.stderr
    if show_traceback:
        assert "Traceback" in proc.stderr
    else:
        assert last.startswith("error: Derm7pt:") and str(missing) in last
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.pt"))
