"""Register a trained run's served model in the MLflow Model Registry (a versioned model on a server).

The model is an ``mlflow.pyfunc`` model whose artifacts are the run's ``models/model.pt`` and
``models/network.json``: loading it rebuilds the network from the description alone
(:func:`cmml_monai.deploy.load_network`), never from the training data. Its signature names the inputs,
``image`` ``[B, C, *spatial]`` and ``tabular`` ``[B, F]`` (float32, NaN = missing; ``tabular`` only when
the network has a table), and the output, ``[B, K]`` probabilities (softmax, or a sigmoid per label) or,
with ``params={"output": "logits"}``, the logits. The table's column names, the classes and the channel
layout are in the model's metadata and in the version's tags; the run's sweep metrics
(``sweep/summary.json``, ``sweep/sweep.csv``) are logged on the model and tagged on the version.

The model is logged into the training run that ``<run_dir>/mlflow_run.json`` records when that run is in
the target store; otherwise into a new run of the target store tagged ``cmml.training_run`` (the training
run's id) and ``cmml.training_tracking_uri``. Each call adds a version (the first is 1).

Command::

    python -m cmml_monai.deploy.register outputs/derm7pt_cmml --name cmml-derm7pt \\
        --tracking_uri http://mlflow.hospital:5000

The store is ``--tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the training run's store (recorded in
``mlflow_run.json``), else ``sqlite:///<run_dir>/mlruns.db``. Load it back with
``mlflow.pyfunc.load_model("models:/cmml-derm7pt/1")`` (the ``cmml_monai`` package must be installed).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models.signature import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

import cmml_monai
from cmml_monai.data.errors import DataError
from cmml_monai.deploy.description import (
    DESCRIPTION_NAME,
    WEIGHTS_NAME,
    described_method,
    load_description,
    load_network,
)
from cmml_monai.deploy.inference import probabilities
from cmml_monai.handlers.mlflow import RUN_STATE_NAME, TRAINING_RUN_TAG, check_tracking_server, resolve_tracking_uri

__all__ = [
    "CMMLPyfuncModel",
    "model_signature",
    "run_metrics",
    "default_model_name",
    "register_model",
    "main",
    "OUTPUTS",
]

logger = logging.getLogger(__name__)

#: what ``predict`` returns, chosen by ``params={"output": ...}``
OUTPUTS = ("probabilities", "logits")
#: the artifact keys of the logged model
_WEIGHTS_KEY, _DESCRIPTION_KEY = "weights", "description"
#: MLflow's rule for registered model names is loose; this keeps names that work in URIs and on any store
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TRAINING_URI_TAG = "cmml.training_tracking_uri"


class CMMLPyfuncModel(PythonModel):
    """The served network as an MLflow ``pyfunc`` model, rebuilt from ``network.json`` + ``model.pt``.

    ``predict`` takes ``{"image": array [B, C, *spatial], "tabular": array [B, F]}`` (float32; an all-NaN
    modality or table value is missing; a network without a table takes ``image`` alone, or the array
    itself) and returns a ``[B, K]`` float32 array: probabilities, or logits with
    ``params={"output": "logits"}``.

    Example:
        >>> model = mlflow.pyfunc.load_model("models:/cmml-derm7pt/1")  # doctest: +SKIP
        >>> model.predict({"image": image, "tabular": tabular}).shape
        (2, 5)
    """

    def load_context(self, context: PythonModelContext) -> None:
        folder = os.path.dirname(context.artifacts[_WEIGHTS_KEY])
        if os.path.dirname(context.artifacts[_DESCRIPTION_KEY]) != folder:
            raise DataError(
                f"the logged weights and {DESCRIPTION_NAME} are not in one folder: register the model again"
            )
        self.description = load_description(folder)
        self.network = load_network(folder, context.artifacts[_WEIGHTS_KEY], "cpu")
        self.has_table = bool(self.description["inputs"].get("tabular"))

    # model_input has no type hint on purpose: MLflow infers a signature from one (and warns when it cannot,
    # as for a dict of arrays); the signature is given explicitly at log time (model_signature)
    def predict(
        self, context: PythonModelContext | None, model_input, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """``[B, K]`` probabilities (or logits) of ``{"image": ..., "tabular": ...}`` (see the class)."""
        output = str((params or {}).get("output", OUTPUTS[0]))
        if output not in OUTPUTS:
            raise ValueError(f"params output={output!r}: use one of {list(OUTPUTS)}")
        if isinstance(model_input, Mapping):
            if "image" not in model_input:
                raise ValueError(f"model input has keys {sorted(model_input)}: 'image' is required")
            image = model_input["image"]
            tabular = model_input.get("tabular") if self.has_table else None
        else:  # a bare array: the image of a network without a table
            image, tabular = model_input, None
        if self.has_table and tabular is None:
            raise ValueError("the network takes 'tabular' too: pass it (all-NaN rows for cases without the table)")
        args = [torch.as_tensor(np.asarray(image, dtype=np.float32))]
        if tabular is not None:
            args.append(torch.as_tensor(np.asarray(tabular, dtype=np.float32)))
        with torch.no_grad():
            logits = self.network(*args).float()
        if output == "logits":
            return logits.numpy()
        return probabilities(logits, bool(self.description["data"]["multi_label"])).numpy()


def model_signature(description: Mapping[str, Any]) -> ModelSignature:
    """The pyfunc signature of the described network: ``image`` (and ``tabular``) in, ``[B, K]`` out, and
    the ``output`` parameter (``"probabilities"`` or ``"logits"``).

    Example:
        >>> sig = model_signature(load_description("outputs/derm7pt_cmml/models"))  # doctest: +SKIP
        >>> [s.name for s in sig.inputs.inputs]
        ['image', 'tabular']
    """
    inputs = description["inputs"]
    specs = [TensorSpec(np.dtype(np.float32), (-1, *[int(s) for s in inputs["image"]]), "image")]
    if inputs.get("tabular"):
        specs.append(TensorSpec(np.dtype(np.float32), (-1, int(inputs["tabular"])), "tabular"))
    classes = len(description["data"]["class_names"])
    out = Schema([TensorSpec(np.dtype(np.float32), (-1, classes), "scores")])
    return ModelSignature(Schema(specs), out, ParamSchema([ParamSpec("output", "string", OUTPUTS[0])]))


def _table_columns(description: Mapping[str, Any]) -> list[str]:
    schema = description["data"].get("table_schema") or {}
    return [str(c["name"]) for c in schema.get("columns", [])]


def run_metrics(run_dir: str) -> dict[str, float]:
    """The run's test metrics from its missing-rate sweep: ``avg_auc_<split>`` (``sweep/summary.json``) and
    ``<metric>_rate_<rate>`` for each row of ``sweep/sweep.csv`` (auc, acc, f1, ece). Empty without a sweep.

    Example:
        >>> run_metrics("outputs/derm7pt_cmml")  # doctest: +SKIP
        {'avg_auc_test': 0.72, 'auc_rate_0': 0.74, 'acc_rate_0': 0.25, ...}
    """
    folder = os.path.join(run_dir, "sweep")
    metrics: dict[str, float] = {}
    summary_path = os.path.join(folder, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        if isinstance(summary, dict) and summary.get("avg_auc") is not None:
            metrics[f"avg_auc_{summary.get('split', 'test')}"] = float(summary["avg_auc"])
    sweep_path = os.path.join(folder, "sweep.csv")
    if os.path.isfile(sweep_path):
        with open(sweep_path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                rate = f"{float(row['rate']):g}"
                for key in ("auc", "acc", "f1", "ece"):
                    value = row.get(key)
                    if value not in (None, ""):  # a NaN (e.g. one class present) stays NaN in MLflow
                        metrics[f"{key}_rate_{rate}"] = float(value)
    return metrics


def default_model_name(description: Mapping[str, Any]) -> str:
    """``cmml-<dataset>-<method>``, e.g. ``cmml-derm7pt-cmml``.

    Example:
        >>> default_model_name(load_description("outputs/derm7pt_cmml/models"))  # doctest: +SKIP
        'cmml-derm7pt-cmml'
    """
    name = f"cmml-{description['data']['dataset']}-{described_method(description)}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _training_state(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, RUN_STATE_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the recorded MLflow run ({e}); remove it to register unlinked") from e
    return state if isinstance(state, dict) else {}


def _resolve_uri(run_dir: str, tracking_uri: str | None, state: Mapping[str, Any]) -> str:
    # an explicit argument wins over the environment here: registering is a deliberate, one-off command
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or state.get("tracking_uri") or None
    recorded = uri is not None and uri == state.get("tracking_uri") and not tracking_uri
    if recorded and uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///") :]):
        # a run folder copied from another machine: sqlite would silently create an empty store here
        raise DataError(
            f"the training store {uri} recorded in {os.path.join(run_dir, RUN_STATE_NAME)} does not "
            "exist here; pass --tracking_uri (or set MLFLOW_TRACKING_URI) to register elsewhere"
        )
    if uri is None:
        return resolve_tracking_uri(run_dir)  # nothing set anywhere: the training default, <run_dir>/mlruns.db
    if uri.startswith("file:") or "://" not in uri:
        raise DataError(
            f"tracking_uri={uri!r}: MLflow 3.17 refuses file stores (and so its model registry); "
            "use sqlite:///<path>/mlruns.db or http://host:port"
        )
    return uri


def _training_run(client: mlflow.MlflowClient, run_id: str | None) -> mlflow.entities.Run | None:
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None  # recorded in another store, or deleted: the model gets a run of its own
    return run if run.info.lifecycle_stage == "active" else None


def _model_metadata(desc: Mapping[str, Any], columns: list[str]) -> dict[str, Any]:
    """The pyfunc model's metadata: what a caller needs to build its inputs and read its outputs."""
    data = desc["data"]
    return {
        "cmml_monai_version": cmml_monai.__version__,
        "dataset": data["dataset"],
        "method": described_method(desc),
        "class_names": [str(c) for c in data["class_names"]],
        "multi_label": bool(data["multi_label"]),
        "modalities": data["modalities"],
        "image_shape": desc["inputs"]["image"],
        "tabular_columns": columns,
        "weights_sha256": desc.get("weights_sha256"),
        "missing": "an all-NaN image modality or table value is missing",
    }


def _version_tags(
    meta: Mapping[str, Any], columns: list[str], metrics: Mapping[str, float], state: Mapping[str, Any]
) -> dict[str, str]:
    """The version's tags: inputs, classes, the sweep metrics (``metric.*``) and the training run's link."""
    tags = {
        "dataset": meta["dataset"],
        "method": meta["method"],
        "classes": ",".join(meta["class_names"]),
        "image_shape": "x".join(str(s) for s in meta["image_shape"]),
        "tabular_columns": ",".join(columns),
        **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
    }
    if state.get("parent"):
        tags[TRAINING_RUN_TAG] = str(state["parent"])
        tags[_TRAINING_URI_TAG] = str(state.get("tracking_uri", ""))
    return tags


def _version_text(meta: Mapping[str, Any], columns: list[str], metrics: Mapping[str, float]) -> str:
    """The version's default description: method, dataset, classes, inputs and the average AUCs."""
    return (
        f"{meta['method']} on {meta['dataset']}: classes {', '.join(meta['class_names'])}; inputs image "
        f"{meta['image_shape']}"
        + (f" and tabular {columns}" if columns else "")
        + "".join(
            f"; average {k.replace('avg_auc_', '')} AUC over the missing rates {v:.4f}"
            for k, v in metrics.items()
            if k.startswith("avg_auc_")
        )
    )


def _model_run(
    client: mlflow.MlflowClient,
    training: mlflow.entities.Run | None,
    experiment_name: str,
    name: str,
    tags: Mapping[str, str],
) -> str:
    """The run that holds the model: the training run, else a new one of ``experiment_name`` linked to it."""
    if training is not None:
        return training.info.run_id
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    run_tags = {k: tags[k] for k in (TRAINING_RUN_TAG, _TRAINING_URI_TAG) if k in tags}
    return client.create_run(experiment_id, run_name=f"register-{name}", tags=run_tags).info.run_id


def _log_model(
    run_id: str,
    desc: Mapping[str, Any],
    weights: str,
    meta: Mapping[str, Any],
    tags: Mapping[str, str],
    metrics: Mapping[str, float],
    in_training_run: bool,
) -> Any:
    """Log the pyfunc model (and its metrics) into run ``run_id`` of the current tracking URI."""
    requirements = [
        f"cmml-monai=={cmml_monai.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
    ]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=CMMLPyfuncModel(),
            artifacts={_WEIGHTS_KEY: weights, _DESCRIPTION_KEY: os.path.join(desc["model_dir"], DESCRIPTION_NAME)},
            signature=model_signature(desc),
            pip_requirements=requirements,
            metadata=dict(meta),
            tags={k: v for k, v in tags.items() if not k.startswith("metric.")},
        )
        if metrics:
            mlflow.log_metrics(dict(metrics), model_id=info.model_id)
            if not in_training_run:  # the training run has them already (its test_* metrics)
                mlflow.log_metrics(dict(metrics))
    return info


def _register_version(
    client: mlflow.MlflowClient, name: str, info: Any, run_id: str, tags: Mapping[str, str], text: str
) -> mlflow.entities.model_registry.ModelVersion:
    """A new version of registered model ``name`` (created if new) from the logged model ``info``."""
    # the client, not the fluent API: a registry URI set globally by the caller does not redirect it
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="cmml-monai: multimodal diagnosis with missing modalities")
    return client.create_model_version(
        name, info.model_uri, run_id=run_id, tags=dict(tags), description=text, model_id=info.model_id
    )


def _store(run_root: str, tracking_uri: str | None) -> tuple[str, dict[str, Any], mlflow.MlflowClient]:
    """The target store's URI (checked reachable), the training run's recorded state and a client on it."""
    state = _training_state(run_root)
    try:
        uri = _resolve_uri(run_root, tracking_uri, state)
    except ValueError as e:
        raise DataError(str(e)) from e
    check_tracking_server(uri, run_root)
    return uri, state, mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_model(
    run_dir: str,
    name: str | None = None,
    tracking_uri: str | None = None,
    experiment_name: str = "cmml",
    checkpoint: str | None = None,
    description: str | None = None,
) -> mlflow.entities.model_registry.ModelVersion:
    """Log the run's served model as an ``mlflow.pyfunc`` model and register it as a new version of ``name``.

    Args:
        run_dir: a training run's output folder (or its ``models/`` folder).
        name: the registered model (default :func:`default_model_name`).
        tracking_uri: the store (default: ``MLFLOW_TRACKING_URI``, else the training run's store, else
            ``sqlite:///<run_dir>/mlruns.db``); its model registry is used.
        experiment_name: the experiment of the run that holds the model when the training run is not in the
            target store.
        checkpoint: other weights of the same run (default ``models/model.pt``).
        description: the version's description (default: the dataset, method, classes and metrics).

    Returns:
        the new model version (``.version`` is ``"1"`` for the first one).

    Raises:
        DataError: no description or weights, weights that do not fit it, a bad name, a ``file:`` store or an
            unreachable tracking server (before anything is logged).

    Example:
        >>> v = register_model("outputs/derm7pt_cmml", "cmml-derm7pt", "http://127.0.0.1:5000")  # doctest: +SKIP
        >>> mlflow.pyfunc.load_model(f"models:/cmml-derm7pt/{v.version}").predict({"image": x, "tabular": t})
    """
    desc = load_description(run_dir)
    folder = desc["model_dir"]
    weights = checkpoint or os.path.join(folder, desc.get("weights", WEIGHTS_NAME))
    load_network(folder, weights, "cpu")  # refuses weights that do not fit, before anything is logged
    name = name or default_model_name(desc)
    if not _NAME.match(name):
        raise DataError(
            f"model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    run_root = os.path.dirname(folder) if os.path.basename(os.path.normpath(folder)) == "models" else folder
    uri, state, client = _store(run_root, tracking_uri)
    training = _training_run(client, state.get("parent")) if state.get("tracking_uri") == uri else None
    metrics, columns = run_metrics(run_root), _table_columns(desc)
    meta = _model_metadata(desc, columns)
    tags = _version_tags(meta, columns, metrics, state)
    text = description or _version_text(meta, columns, metrics)

    # the fluent API logs the model (it links it to the run); the global URI is restored afterwards.
    # set_tracking_uri also sets MLFLOW_TRACKING_URI, so the variable's old value is what is restored
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        run_id = _model_run(client, training, experiment_name, name, tags)
        status = client.get_run(run_id).info.status
        info = _log_model(run_id, desc, weights, meta, tags, metrics, training is not None)
        if training is not None and status not in ("FINISHED", "RUNNING"):
            client.update_run(run_id, status=status)  # start_run reopened the run and ended it FINISHED
        # still inside the block: the store resolves the source models:/<model id> through the global tracking URI
        version = _register_version(client, name, info, run_id, tags, text)
    finally:
        mlflow.set_tracking_uri(previous)
    logger.info("registered %s version %s (run %s) at %s", name, version.version, run_id, uri)
    return version


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cmml_monai.deploy.register RUN_DIR [--name NAME] [--tracking_uri URI] ...``; 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m cmml_monai.deploy.register",
        description="Register a trained run's served model (models/model.pt + network.json) in the MLflow Model "
        "Registry as a new version, with its input signature and the run's sweep metrics.",
    )
    parser.add_argument("run_dir", help="the training run's output folder (models/ holds model.pt and network.json)")
    parser.add_argument("--name", default=None, help="registered model name (default cmml-<dataset>-<method>)")
    parser.add_argument(
        "--tracking_uri",
        default=None,
        help="MLflow store (default: MLFLOW_TRACKING_URI, else the training run's store, "
        "else sqlite:///RUN_DIR/mlruns.db)",
    )
    parser.add_argument(
        "--experiment_name",
        default="cmml",
        help="experiment of the model's run when the training run is not in that store",
    )
    parser.add_argument("--checkpoint", default=None, help="weights to register (default RUN_DIR/models/model.pt)")
    args = parser.parse_args(argv)
    try:
        version = register_model(args.run_dir, args.name, args.tracking_uri, args.experiment_name, args.checkpoint)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"registered {version.name} version {version.version} (run {version.run_id}); "
        f"load it with mlflow.pyfunc.load_model('models:/{version.name}/{version.version}')"
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
