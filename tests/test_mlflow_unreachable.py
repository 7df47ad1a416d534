"""An unreachable MLflow tracking server stops the run before the first epoch with one line."""

from __future__ import annotations

import os
import socket

import pytest
from monai.bundle import ConfigWorkflow

from cmml_monai.data.errors import DataError, find_data_error
from cmml_monai.handlers import MLflowTracker

from bundle_helpers import ROOT, SMALL_SIZES, TRAIN

HTTP_SETTINGS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


@pytest.fixture
def closed_port_uri(monkeypatch) -> str:
    """``http://127.0.0.1:<port>`` where nothing listens (a port the OS just handed out, then released)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in HTTP_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_tracker_refuses_a_closed_port_with_one_line(closed_port_uri, tmp_path):
    with pytest.raises(DataError) as raised:
        MLflowTracker(output_dir=str(tmp_path), tracking_uri=closed_port_uri)
    msg = str(raised.value)
    assert msg.startswith(f"MLflow tracking server {closed_port_uri} cannot be reached (")
    assert f"{tmp_path}/mlruns.db" in msg and "--mlflow_enabled false" in msg and "\n" not in msg
    assert not [k for k in HTTP_SETTINGS if k in os.environ]  # the short timeout was for the check only
    assert MLflowTracker(output_dir=str(tmp_path), tracking_uri=closed_port_uri, enabled=False).enabled is False


def test_bundle_stops_before_the_first_epoch(closed_port_uri, tmp_path):
    out = tmp_path / "run"
    w = ConfigWorkflow(
        config_file=TRAIN,
        workflow_type="train",
        bundle_root=ROOT,
        dataset_dir=str(tmp_path / "derm7pt"),
        synthetic_cases=30,
        output_dir=str(out),
        shared_dir=str(out / "shared"),
        **SMALL_SIZES,
        tracking_uri=closed_port_uri,
        mlflow_enabled=True,
    )
    w.initialize()
    with pytest.raises(Exception) as raised:
        w.run()
    err = find_data_error(raised.value)
    assert err is not None and closed_port_uri in str(err)
    assert not (out / "stage1").exists() and not list(out.rglob("*.pt"))
