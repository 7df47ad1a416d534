"""Steps of the two-stage workflow that the ``run`` list of ``configs/train.json`` calls.

It lives in ``evaluation``, above ``handlers``, because its steps use the checkpoint and MLflow handlers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
from monai.engines import Workflow

from cmml_monai.data.errors import DataError
from cmml_monai.data.fingerprint import SHORT, fingerprint_of, ids_fingerprint_of
from cmml_monai.data.jsonio import atomic_path, atomic_write_json
from cmml_monai.data.report import summarize
from cmml_monai.handlers.checkpoint import latest_checkpoint
from cmml_monai.handlers.mlflow import save_executed_config

__all__ = [
    "run_stage",
    "publish_model",
    "check_serve",
    "SERVE_CHOICES",
    "final_model_path",
    "log_run_inputs",
    "bind_output_dir",
]

logger = logging.getLogger(__name__)

#: the ``summarize`` entries logged as ``data.*`` params: counts keyed by split, class and modality names
#: (missing/dropped reasons are free text, not valid param names; the schema artifact carries the columns)
_SUMMARY_PARAMS = (
    "name",
    "n_cases",
    "multi_label",
    "splits",
    "label_counts",
    "missing",
    "by_split",
    "dropped",
    "all_present",
)


def run_stage(trainer: Workflow, name: str = "") -> bool:
    """Run ``trainer`` unless it has 0 epochs (a method without that stage). Returns whether it ran."""
    if int(trainer.state.max_epochs or 0) < 1:
        logger.info("%s: 0 epochs, skipped", name or "stage")
        return False
    logger.info("%s: training for %d epochs", name or "stage", trainer.state.max_epochs)
    trainer.run()
    return True


def final_model_path(output_dir: str) -> str:
    """``<output_dir>/models/model.pt``: the served weights (what evaluation and export load)."""
    return os.path.join(output_dir, "models", "model.pt")


SERVE_CHOICES = ("best", "last")
DATASET_FILE = "dataset_fingerprint.json"


def bind_output_dir(output_dir: str, case_list) -> str:
    """Record which dataset ``output_dir`` trains on (``dataset_fingerprint.json``); refuse another one.

    A training run resumes from the checkpoints in its ``output_dir`` and rewrites its table schema
    there, so a second dataset trained into the same folder would continue the first one's model (or
    fail on a shape mismatch). train.json calls this at ``initialize``, before anything is written.
    Folders made before the file existed are adopted.

    Returns:
        The case fingerprint of ``case_list``.

    Raises:
        DataError: ``output_dir`` holds a run of another dataset (one line naming the folder and what to do).
    """
    fingerprint = fingerprint_of(case_list)
    path = os.path.join(output_dir, DATASET_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                recorded = json.load(f)
            if not isinstance(recorded, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable ({e}); delete it if {output_dir} holds a run of this dataset") from e
        # a folder recorded before the fingerprint covered the split (ids only) is adopted
        if recorded.get("fingerprint") not in (None, fingerprint, ids_fingerprint_of(case_list)):
            raise DataError(
                f"{output_dir}: holds a run trained on another dataset ({recorded.get('dataset')}, cases fingerprint "
                f"{str(recorded.get('fingerprint'))[:SHORT]}, now {fingerprint[:SHORT]}); its checkpoints would be "
                "resumed: pass --output_dir DIR for this dataset, or delete the folder to train it there"
            )
        return fingerprint
    n_cases = len(case_list.cases)
    atomic_write_json(path, {"dataset": case_list.name, "fingerprint": fingerprint, "cases": n_cases})
    return fingerprint


def check_serve(serve: str) -> str:
    """``serve`` when it is one of ``SERVE_CHOICES``; train.json checks it at ``initialize``, so a typo
    stops the run before training rather than after it.

    Raises:
        DataError: any other value, named in the message (a ``ValueError``; bundle runs print it as one line).
    """
    if serve not in SERVE_CHOICES:
        raise DataError(f"serve must be one of {SERVE_CHOICES}, got {serve!r}: use --serve best or --serve last")
    return serve


def publish_model(output_dir: str, stage_dirs: list[str], tracker=None, serve: str = "best") -> str:
    """Write the served weights of the last stage that trained to ``models/model.pt``.

    Args:
        output_dir: the run's output folder.
        stage_dirs: the stages' checkpoint folders, in training order.
        tracker: an ``MLflowTracker``; the served file is logged as an artifact when it is enabled.
        serve: ``"best"``: the stage's ``model_best.pt`` (best validation AUC from ``best_min_epoch``),
            or its last epoch when it never validated; ``"last"``: the network of the stage's last
            epoch checkpoint, whatever the validation said.

    Raises:
        DataError: ``serve`` is not one of ``SERVE_CHOICES`` (a ``ValueError``).
        FileNotFoundError: no stage has a checkpoint.

    Example::

        >>> publish_model("runs/derm", ["runs/derm/stage1", "runs/derm/stage2"], serve="last")  # doctest: +SKIP
        'runs/derm/models/model.pt'
    """
    check_serve(serve)
    dest = final_model_path(output_dir)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    for folder in reversed(stage_dirs):
        best = os.path.join(folder, "model_best.pt")
        if serve == "best" and os.path.isfile(best):
            with atomic_path(dest) as tmp:
                shutil.copyfile(best, tmp)
            source = best
            break
        last = latest_checkpoint(folder)
        if last is not None:
            state = torch.load(last, map_location="cpu", weights_only=True)
            # with weight averaging on, the averaged weights are what validation scored and is served
            with atomic_path(dest) as tmp:
                torch.save(state.get("averager") or state["network"], tmp)
            source = last
            break
    else:
        raise FileNotFoundError(f"no checkpoint in {stage_dirs}: nothing was trained")
    logger.info("served weights (serve %s): %s from %s", serve, dest, source)
    if tracker is not None and getattr(tracker, "enabled", False):
        tracker.log_artifact(dest, "models")
    return dest


def log_run_inputs(
    tracker, output_dir: str, case_list, schema_path: str | None = None, config_name: str = "config_executed.json"
) -> None:
    """Log what a run was made from to the parent MLflow run: the executed config, the table schema,
    and the dataset summary (counts only) as params."""
    os.makedirs(output_dir, exist_ok=True)
    config = save_executed_config(os.path.join(output_dir, config_name))
    if tracker is None or not getattr(tracker, "enabled", False):
        return
    summary = summarize(case_list)
    tracker.log_params({"data": {key: summary[key] for key in _SUMMARY_PARAMS}})
    tracker.log_artifact(config, "config")
    if schema_path and os.path.isfile(schema_path):
        tracker.log_artifact(schema_path, "config")
