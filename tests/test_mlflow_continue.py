"""A restarted run continues its MLflow runs; an evaluation gets its own run linked to the training run."""

from __future__ import annotations

import json
import math
import os

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from cmml_monai.handlers import MLflowTracker
from cmml_monai.handlers.mlflow import RUN_STATE_NAME, TRAINING_RUN_TAG


def tracker(out: str, **kwargs) -> MLflowTracker:
    return MLflowTracker(
        output_dir=out,
        experiment_name="continue",
        run_name=kwargs.pop("run_name", "train_1"),
        params={"seed": 0},
        **kwargs,
    )


def test_restart_continues_parent_and_stage_runs(tmp_path):
    out = str(tmp_path / "run")
    first = tracker(out)
    parent, stage1 = first.parent_run_id, first.child_run_id("stage1")
    first.log_metrics({"val_auc": 0.5}, step=1, child="stage1")
    # the process dies here: nothing is closed, the runs stay RUNNING

    second = tracker(out, run_name="train_2")  # a rerun of the same command: a new default name
    assert second.parent_run_id == parent and second.child_run_id("stage1") == stage1
    assert second.run_name == "train_1"  # the continued run keeps its name, so new stage runs match it
    stage2 = second.child_run_id("stage2")
    second.log_metrics({"val_auc": 0.75}, step=2, child="stage1")
    second.close()

    client = mlflow.MlflowClient(tracking_uri=second.tracking_uri)
    runs = client.search_runs([second.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([parent, stage1, stage2])
    assert all(r.info.status == "FINISHED" for r in runs)
    assert [(m.step, m.value) for m in client.get_metric_history(stage1, "val_auc")] == [(1, 0.5), (2, 0.75)]
    assert client.get_run(stage2).info.run_name == "train_1/stage2"
    saved = json.load(open(os.path.join(out, RUN_STATE_NAME)))
    assert saved["parent"] == parent and saved["children"] == {"stage1": stage1, "stage2": stage2}


def test_evaluation_is_a_new_run_linked_to_the_training_run(tmp_path):
    out = str(tmp_path / "run")
    train = tracker(out)
    parent = train.parent_run_id
    train.close()
    state = open(os.path.join(out, RUN_STATE_NAME)).read()

    evaluation = tracker(out, run_name="eval_1", continue_run=False)
    assert evaluation.parent_run_id != parent
    run = mlflow.MlflowClient(tracking_uri=evaluation.tracking_uri).get_run(evaluation.parent_run_id)
    assert run.data.tags[TRAINING_RUN_TAG] == parent
    evaluation.close()
    assert open(os.path.join(out, RUN_STATE_NAME)).read() == state  # a later resume still finds training


def test_recorded_run_of_another_store_or_deleted_starts_a_new_run(tmp_path):
    out = str(tmp_path / "run")
    first = tracker(out)
    parent = first.parent_run_id
    first.close()
    other = tracker(out, tracking_uri="sqlite:///" + str(tmp_path / "other.db"))
    assert other.parent_run_id != parent  # another store: the recorded id means nothing there
    other.close()

    again = tracker(out, tracking_uri="sqlite:///" + str(tmp_path / "other.db"))
    recorded = again.parent_run_id
    assert recorded == other.parent_run_id  # the file now records the other store's run
    again.client.delete_run(recorded)
    fresh = tracker(out, tracking_uri="sqlite:///" + str(tmp_path / "other.db"))
    assert fresh.parent_run_id not in (recorded, parent)


def test_unreadable_record_starts_a_new_run(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_STATE_NAME).write_text("{not json")
    t = tracker(str(out))
    assert t.parent_run_id
    assert json.load(open(out / RUN_STATE_NAME))["parent"] == t.parent_run_id


def test_nan_metric_is_logged_as_nan(tmp_path):
    """An AUC of a split with one class present is NaN: MLflow shows it as NaN instead of no value."""
    run = tracker(str(tmp_path / "run"))
    run.log_metrics({"test_auc_rate_0.5": float("nan"), "test_avg_auc": 0.75})
    run.close()
    metrics = mlflow.MlflowClient(tracking_uri=run.tracking_uri).get_run(run.parent_run_id).data.metrics
    assert math.isnan(metrics["test_auc_rate_0.5"]) and metrics["test_avg_auc"] == 0.75


def test_stage_runs_carry_mlflow_parent_tag(tmp_path):
    run = tracker(str(tmp_path / "run"))
    stage = run.child_run_id("stage1")
    run.close()
    tags = mlflow.MlflowClient(tracking_uri=run.tracking_uri).get_run(stage).data.tags
    assert tags[MLFLOW_PARENT_RUN_ID] == run.parent_run_id
