"""Training logs to a real ``mlflow server`` (``conftest.mlflow_server``): a parent run with one nested run per stage,
metrics, artifacts."""

from __future__ import annotations

import os

import mlflow
import pytest
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from monai.bundle import ConfigWorkflow

from bundle_helpers import ROOT, SMALL_SIZES, TRAIN


@pytest.mark.slow  # ~1 min: .ci/run runs it (pytest -m slow -k ...)
def test_training_logs_parent_and_stage_runs_to_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = str(tmp_path / "run")
    w = ConfigWorkflow(
        config_file=TRAIN,
        workflow_type="train",
        bundle_root=ROOT,
        dataset_dir=str(tmp_path / "syn"),
        synthetic_cases=24,
        output_dir=out,
        shared_dir=os.path.join(out, "shared"),
        **SMALL_SIZES,
        missing_rates=[0.0, 0.5],
        tracking_uri=mlflow_server,
        experiment_name="cmml_server_test",
        **{"sweep#subsets": False},
    )
    w.initialize()
    w.run()
    w.finalize()
    assert not os.path.exists(os.path.join(out, "mlruns.db"))  # nothing went to the local default store

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("cmml_server_test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id}
    assert set(children) == {"stage1", "stage2"}
    assert all(r.info.status == "FINISHED" for r in [parent, *children.values()])
    # params: config essentials, dataset summary (counts only), missing rates
    p = parent.data.params
    assert p["method"] == "cmml" and p["missing_rates"] == "[0.0, 0.5]"
    assert (p["synthetic"], p["synthetic_seed"], p["seed"]) == ("True", "0", "0")  # which draw, which training seed
    assert (p["serve"], p["best_min_epoch"]) == ("best", "2")  # which weights were served
    assert int(p["data.by_split.train.cases"]) > 0 and "data.by_split.test.missing.clinic" in p
    assert not any("case_id" in k for k in p)
    # per-epoch metrics of each stage
    assert {"train_loss", "train_loss_rec", "val_auc"} <= set(children["stage1"].data.metrics)
    assert {"train_loss", "train_loss_align", "train_loss_supcon", "val_auc"} <= set(children["stage2"].data.metrics)
    history = client.get_metric_history(children["stage2"].info.run_id, "val_auc")
    assert [m.step for m in history] == [1] and 0.0 <= history[0].value <= 1.0
    assert 0.0 <= parent.data.metrics["test_avg_auc"] <= 1.0
    assert all(0.0 <= parent.data.metrics[f"test_ece_rate_{r:g}"] <= 1.0 for r in (0.0, 0.5))
    # artifacts: schema, best checkpoint, sweep table and plot, ROC plots
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config", "models", "sweep"} <= top
    assert "config/table_schema.json" in {a.path for a in client.list_artifacts(parent.info.run_id, "config")}
    sweep = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/sweep.csv", "sweep/sweep.png", "sweep/roc"} <= sweep
    assert {a.path for a in client.list_artifacts(children["stage2"].info.run_id)} == {"model_best.pt"}
    local = client.download_artifacts(parent.info.run_id, "sweep/sweep.csv", str(tmp_path / "dl"))
    assert open(local).readline().strip() == "method,rate,auc,acc,f1,ece,n"
