"""``python -m cmml_monai.deploy.register`` (issue #17): the served model in the MLflow Model Registry.

One tiny training run (synthetic Derm7pt, 32 px, 1 + 1 epochs) logs to a local sqlite store; its model is
registered twice into that store (versions 1 and 2, linked to the training run) and once into a real
``mlflow server`` (a run of its own, tagged with the training run). Each version is loaded back with
``mlflow.pyfunc.load_model("models:/NAME/N")`` and predicts a batch with missing modalities as the eager
network does (1e-5).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from cmml_monai.deploy import example_inputs, load_description, load_network
from cmml_monai.deploy.description import described_image_encoder, described_method
from cmml_monai.deploy.register import default_model_name, register_model, run_metrics
from cmml_monai.deploy.register import main as register_main

from bundle_helpers import train_tiny_derm7pt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
ENV.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """``{"run", "uri", "parent"}``: a tiny run tracked in its own sqlite store."""
    root = tmp_path_factory.mktemp("register")
    uri = f"sqlite:///{root / 'train.db'}"
    data, run, w = train_tiny_derm7pt(root, mlflow_enabled=True, tracking_uri=uri, experiment_name="cmml_register")
    w.finalize()
    with open(os.path.join(run, "mlflow_run.json"), encoding="utf-8") as f:
        parent = json.load(f)["parent"]
    return {"run": run, "uri": uri, "parent": parent}


def _batch(run: str) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """Four cases: complete, no clinic image, no table, derm image only; and the eager network's logits."""
    desc = load_description(run)
    image, tabular = example_inputs(desc, batch_size=4, seed=3)
    image[1, 0:3] = float("nan")
    tabular[2] = float("nan")
    image[3, 0:3], tabular[3] = float("nan"), float("nan")
    with torch.no_grad():
        logits = load_network(run)(image, tabular)
    return {"image": image.numpy(), "tabular": tabular.numpy()}, logits


def _check_loaded(uri: str, name: str, version: str, run: str) -> None:
    previous = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri sets the variable too
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    finally:
        mlflow.set_tracking_uri(previous)
    batch, logits = _batch(run)
    probs = model.predict(batch)
    assert probs.shape == (4, 5) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, torch.softmax(logits, dim=1).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.predict(batch, params={"output": "logits"}), logits.numpy(), atol=1e-5, rtol=0)
    inputs = {s.name: s.shape for s in model.metadata.get_input_schema().inputs}
    assert inputs == {"image": (-1, 6, 32, 32), "tabular": (-1, 3)}
    assert model.metadata.metadata["tabular_columns"] == ["elevation", "location", "sex"]
    assert model.metadata.metadata["class_names"] == ["BCC", "NEV", "MEL", "MISC", "SK"]
    with pytest.raises(Exception, match="logits"):
        model.predict(batch, params={"output": "labels"})


def test_register_twice_into_the_training_store(trained, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = register_model(trained["run"], "cmml-derm-tiny")  # the store recorded in mlflow_run.json
    second = register_model(trained["run"], "cmml-derm-tiny")
    assert (str(first.version), str(second.version)) == ("1", "2")  # int on sqlite, str over REST
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the global URI was restored
    client = mlflow.MlflowClient(tracking_uri=trained["uri"])
    version = client.get_model_version("cmml-derm-tiny", "1")
    assert version.run_id == trained["parent"]  # logged into the training run itself
    assert client.get_run(trained["parent"]).info.status == "FINISHED"
    metrics = run_metrics(trained["run"])
    assert {"avg_auc_test", "auc_rate_0", "auc_rate_0.5", "ece_rate_0.5"} <= set(metrics)
    assert float(version.tags["metric.avg_auc_test"]) == pytest.approx(metrics["avg_auc_test"], abs=1e-5)
    assert version.tags["tabular_columns"] == "elevation,location,sex" and version.tags["image_shape"] == "6x32x32"
    _check_loaded(trained["uri"], "cmml-derm-tiny", "1", trained["run"])


def test_register_into_a_real_mlflow_server(trained, mlflow_server, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "cmml_monai.deploy.register",
        trained["run"],
        "--name",
        "cmml-derm-server",
        "--tracking_uri",
        mlflow_server,
    ]
    done = subprocess.run(cmd, cwd=str(tmp_path), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered cmml-derm-server version 1" in done.stdout
    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version("cmml-derm-server", "1")
    run = client.get_run(version.run_id)  # a run of the server's, linked to the local training run
    assert run.data.tags["cmml.training_run"] == trained["parent"] and version.tags["cmml.training_run"]
    assert run.data.metrics["avg_auc_test"] == pytest.approx(run_metrics(trained["run"])["avg_auc_test"])
    _check_loaded(mlflow_server, "cmml-derm-server", "1", trained["run"])


def test_register_errors_are_one_line(trained, tmp_path, capsys, monkeypatch):
    """Each bad input is one ``error:`` line and status 2: the first through the command line, the others
    through the same ``main`` in this process (a subprocess each cost ~15 s of imports)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "models").mkdir()
    moved = tmp_path / "moved"  # a run folder whose recorded sqlite store is not on this machine
    shutil.copytree(os.path.join(trained["run"], "models"), moved / "models")
    (moved / "mlflow_run.json").write_text(
        json.dumps({"tracking_uri": f"sqlite:///{tmp_path}/gone/mlruns.db", "parent": "0" * 32})
    )
    cases = [
        ([str(moved)], "recorded in"),
        ([str(tmp_path)], "network.json"),
        ([trained["run"], "--name", "bad name!"], "model name 'bad name!'"),
        ([trained["run"], "--tracking_uri", str(tmp_path / "store")], "refuses file stores"),
    ]
    for i, (args, expected) in enumerate(cases):
        if i == 0:
            done = subprocess.run(
                [sys.executable, "-m", "cmml_monai.deploy.register", *args],
                env=ENV,
                capture_output=True,
                text=True,
                timeout=300,
            )
            code, stderr = done.returncode, done.stderr
        else:
            code, stderr = register_main(args), capsys.readouterr().err
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and expected in errors[0], stderr[-2000:]
        assert "Traceback" not in stderr


def test_run_metrics_keeps_nan(tmp_path):
    """A rate whose AUC is NaN (one class present) is registered as NaN, not dropped."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "summary.json").write_text(json.dumps({"avg_auc": 0.7, "split": "test"}))
    (sweep / "sweep.csv").write_text(
        "method,rate,auc,acc,f1,ece,n\ncmml,0.0,0.7,0.5,0.4,0.1,4\ncmml,0.5,nan,0.5,0.4,0.1,4\n"
    )
    metrics = run_metrics(str(tmp_path))
    assert metrics["auc_rate_0"] == pytest.approx(0.7) and np.isnan(metrics["auc_rate_0.5"])
    assert metrics["avg_auc_test"] == pytest.approx(0.7) and len(metrics) == 9


def test_default_model_name_names_the_trained_method():
    # the method sits beside the network's arguments, the backbone inside its encoder component
    desc = {
        "data": {"dataset": "derm7pt"},
        "network": {"method": "zero_fill", "args": {"encoder": {"image_encoder": "resnet10"}}},
    }
    assert default_model_name(desc) == "cmml-derm7pt-zero_fill"
    assert described_method(desc) == "zero_fill" and described_image_encoder(desc) == "resnet10"
    assert described_method({"network": {"method": None, "args": {}}}) == "cmml"
    assert described_image_encoder({"network": {"args": {"encoder": "$custom_encoder"}}}) is None
