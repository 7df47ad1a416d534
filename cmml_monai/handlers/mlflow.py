"""MLflow tracking: one parent run per workflow, one nested run per training stage.

The tracking URI is, in order: ``MLFLOW_TRACKING_URI`` (environment), the ``tracking_uri`` argument
(config), else a local SQLite store ``<output_dir>/mlruns.db`` with artifacts under
``<output_dir>/mlruns`` (MONAI 1.6's default backend; ``file:`` stores are refused by MLflow 3.17).
Only counts, rates and settings are logged: never case ids or other patient identifiers.

A run restarted in the same ``output_dir`` (a resume after a crash or a kill) continues the same MLflow
parent and stage runs: their ids are kept in ``<output_dir>/mlflow_run.json``.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from monai.bundle import ConfigParser
from monai.utils import path_to_sqlite_uri

from cmml_monai.data.errors import DataError
from cmml_monai.data.jsonio import atomic_path, atomic_write_json
from cmml_monai.utils import as_bool

__all__ = [
    "resolve_tracking_uri",
    "check_tracking_server",
    "MLflowTracker",
    "save_executed_config",
    "refuse_monai_tracking",
    "MONAI_TRACKING_MESSAGE",
]

logger = logging.getLogger(__name__)

PARENT_TAG = MLFLOW_PARENT_RUN_ID
#: in ``output_dir``: the ids of the parent and stage runs, so a restarted run continues them
RUN_STATE_NAME = "mlflow_run.json"
#: tag of an evaluation run: the id of the training run it evaluates
TRAINING_RUN_TAG = "cmml.training_run"
_NOT_CONFIG_ARGS = {
    "meta_file",
    "logging_file",
    "init_id",
    "run_id",
    "final_id",
    "tracking",
    "workflow_type",
    "workflow_name",
    "args_file",
    "properties_path",
}


def resolve_tracking_uri(output_dir: str, tracking_uri: str | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` > ``tracking_uri`` > ``sqlite:///<output_dir>/mlruns.db``.

    Raises:
        ValueError: a ``file:`` URI or a bare path (no longer supported by MLflow as a tracking store).
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri
    if not uri:
        os.makedirs(output_dir, exist_ok=True)
        uri = path_to_sqlite_uri(os.path.join(output_dir, "mlruns.db"))
    if uri.startswith("file:") or "://" not in uri:
        raise ValueError(
            f"tracking_uri={uri!r}: MLflow 3.17 refuses file stores; use sqlite:///<path>/mlruns.db or http://host:port"
        )
    return uri


CONNECT_TIMEOUT_S = 5  # the reachability check's HTTP timeout; MLflow's own default retries for minutes


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the block only (MLflow reads its HTTP settings from them per request)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking_server(uri: str, output_dir: str = "<output_dir>", timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast when an HTTP tracking server cannot be used, before any training.

    MLflow retries a failing request with backoff for minutes; a run would then train for hours without
    a record, or die at its first log call. This makes one request with no retry and a ``timeout`` of a
    few seconds. Local stores (``sqlite:``) are not checked.

    Raises:
        DataError: the server does not answer (one line: the URI and the three ways out).

    Example::

        >>> check_tracking_server("http://127.0.0.1:5000")  # doctest: +SKIP
    """
    if not uri.startswith(("http://", "https://")):
        return
    settings = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(timeout))),
    }
    with _environ(**settings):
        try:
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as err:
            # the socket error (refused, timed out, name unknown) is buried in MLflow's retry message
            found = re.search(r"\[Errno -?\d+\] [^'\")\]]+|timed out|Connection refused", str(err))
            detail = found.group(0).strip() if found else (str(err).strip().splitlines() or [""])[0][:160]
            raise DataError(
                f"MLflow tracking server {uri} cannot be reached ({type(err).__name__}: {detail}); start it or fix "
                f"the address, unset tracking_uri / MLFLOW_TRACKING_URI to log into {output_dir}/mlruns.db, "
                "or turn tracking off with --mlflow_enabled false"
            ) from None


#: the one line that refuses MONAI's ``--tracking mlflow`` switch of ``python -m monai.bundle run``
MONAI_TRACKING_MESSAGE = (
    "--tracking (MONAI's switch, e.g. --tracking mlflow) adds MONAI's own MLFlowHandler, which opens a second "
    "MLflow store with a duplicate run: drop it; this bundle tracks every run with its own tracker (on by "
    "default, into <output_dir>/mlruns.db): set --tracking_uri URI or MLFLOW_TRACKING_URI for a server, "
    "--mlflow_enabled false to turn tracking off"
)


def refuse_monai_tracking(save_execute_config: Any = False) -> None:
    """Refuse MONAI's experiment-tracking switch (``--tracking mlflow`` / ``ConfigWorkflow(tracking=...)``) before
    anything runs.

    The bundle config holds ``"save_execute_config": false`` and calls this in ``initialize`` with
    ``@save_execute_config``. MONAI's ``ConfigWorkflow.patch_bundle_tracking`` (what ``tracking`` does) always
    rewrites that key: to ``None`` when it was ``False`` (and not exporting the config), or to the path of
    the exported config. So any value other than ``False`` means the switch was given; with ``False`` in the
    config, MONAI also writes nothing into ``output_dir`` before the refusal.

    Args:
        save_execute_config: the config's ``@save_execute_config``.

    Raises:
        DataError: the switch was given (one line: what to do instead, :data:`MONAI_TRACKING_MESSAGE`).

    Example:
        >>> refuse_monai_tracking(False)  # a plain run
        >>> refuse_monai_tracking(None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cmml_monai.data.errors.DataError: --tracking (MONAI's switch, e.g. --tracking mlflow) adds MONAI's own ...
    """
    if save_execute_config is not False:
        raise DataError(MONAI_TRACKING_MESSAGE)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


class MLflowTracker:
    """Owns the parent run and creates one nested run per stage (``child_run_id(name)``).

    Args:
        output_dir: where the default SQLite store and artifacts live.
        tracking_uri: a tracking server / database URI (``MLFLOW_TRACKING_URI`` wins when set).
        experiment_name: MLflow experiment.
        run_name: parent run name (default ``<run_prefix>_<time>``).
        enabled: False turns every call into a no-op.
        params: parent-run parameters (config essentials, dataset summary, rates), nested dicts allowed.
        tags: parent-run tags.
        continue_run: continue the parent and stage runs recorded in ``<output_dir>/mlflow_run.json`` by
            an earlier process (a resumed training). False (evaluation of a trained run): a new run,
            tagged ``cmml.training_run`` with the recorded training run's id, so the two are linked.

    Raises:
        DataError: an ``http(s)`` tracking server that does not answer within a few seconds
            (:func:`check_tracking_server`): the run stops before training rather than train unrecorded.
    """

    def __init__(
        self,
        output_dir: str,
        tracking_uri: str | None = None,
        experiment_name: str = "cmml",
        run_name: str | None = None,
        enabled: bool = True,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        continue_run: bool = True,
    ) -> None:
        self.enabled = as_bool(enabled, "mlflow_enabled")
        self.continue_run = as_bool(continue_run, "continue_run")
        self.output_dir = output_dir
        self.experiment_name = experiment_name
        self.run_name = run_name or f"cmml_{time.strftime('%Y%m%d_%H%M%S')}"
        self.params = dict(params or {})
        self.tags = dict(tags or {})
        self.tracking_uri = resolve_tracking_uri(output_dir, tracking_uri) if self.enabled else ""
        if self.enabled:
            check_tracking_server(self.tracking_uri, output_dir)  # before training, not at the first log call
        self.artifact_location = None
        if self.tracking_uri.startswith("sqlite:///"):
            self.artifact_location = "file://" + os.path.abspath(os.path.join(output_dir, "mlruns"))
        self._client: mlflow.MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent: str | None = None
        self._children: dict[str, str] = {}

    @property
    def client(self) -> mlflow.MlflowClient:
        if self._client is None:
            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                self._experiment_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=self.artifact_location
                )
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    @property
    def parent_run_id(self) -> str | None:
        """The parent run (created, with its params, on first use; continued after a restart)."""
        if not self.enabled:
            return None
        if self._parent is None:
            if not (self.continue_run and self._continue_saved_run()):
                tags = dict(self.tags)
                if not self.continue_run and os.path.isfile(self.run_state_path):
                    tags[TRAINING_RUN_TAG] = str(self._saved_state().get("parent", ""))
                run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags)
                self._parent = run.info.run_id
                logger.info("MLflow: run %s (%s) at %s", self.run_name, self._parent, self.tracking_uri)
                self._save_run_state()
            if self.params:
                self.log_params(self.params)
        return self._parent

    def child_run_id(self, name: str) -> str | None:
        """The nested run ``<parent name>/<name>`` (created on first use)."""
        if not self.enabled:
            return None
        if name not in self._children:
            parent = self.parent_run_id
            if name not in self._children:  # a continued parent may already own this stage's run
                run = self.client.create_run(
                    self.experiment_id, run_name=f"{self.run_name}/{name}", tags={PARENT_TAG: parent, "stage": name}
                )
                self._children[name] = run.info.run_id
                self._save_run_state()
        return self._children[name]

    @property
    def run_state_path(self) -> str:
        """``<output_dir>/mlflow_run.json``: the run ids a restart in this folder continues."""
        return os.path.join(self.output_dir, RUN_STATE_NAME)

    def _saved_state(self) -> dict:
        with open(self.run_state_path, encoding="utf-8") as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError(f"{self.run_state_path} does not hold a JSON object")
        return saved

    def _save_run_state(self) -> None:
        if not self.continue_run:  # an evaluation run: a later resumed training continues its own run
            return
        os.makedirs(self.output_dir, exist_ok=True)
        atomic_write_json(
            self.run_state_path,
            {
                "tracking_uri": self.tracking_uri,
                "experiment_id": self.experiment_id,
                "run_name": self.run_name,
                "parent": self._parent,
                "children": self._children,
            },
        )

    def _continue_saved_run(self) -> bool:
        """Reopen the parent and stage runs that an earlier process in this ``output_dir`` created.

        Only when they are in the same store and experiment and still exist; otherwise a new run starts
        (and the log says why), so a restart never writes into another experiment's run.
        """
        if not os.path.isfile(self.run_state_path):
            return False
        try:
            saved = self._saved_state()
            same_store = saved["tracking_uri"] == self.tracking_uri and saved["experiment_id"] == self.experiment_id
            parent = self.client.get_run(saved["parent"]) if same_store else None
        except (OSError, ValueError, KeyError, TypeError, mlflow.exceptions.MlflowException) as err:
            logger.warning("MLflow: %s cannot be continued (%s): a new run starts", self.run_state_path, err)
            return False
        if parent is None or parent.info.lifecycle_stage != "active":
            logger.info(
                "MLflow: the run in %s is in another store or was deleted: a new run starts", self.run_state_path
            )
            return False
        self._parent = parent.info.run_id
        self.run_name = saved.get("run_name") or parent.info.run_name
        children = {}
        for name, run_id in dict(saved.get("children") or {}).items():
            try:
                if self.client.get_run(run_id).info.lifecycle_stage == "active":
                    children[name] = run_id
            except mlflow.exceptions.MlflowException:
                continue  # a deleted stage run: that stage gets a new one
        self._children = children
        for run_id in [self._parent, *children.values()]:
            self.client.update_run(run_id, status="RUNNING")
        logger.info("MLflow: continuing run %s (%s) at %s", self.run_name, self._parent, self.tracking_uri)
        return True

    def _run(self, child: str | None) -> str | None:
        return self.child_run_id(child) if child else self.parent_run_id

    def log_params(self, params: Mapping[str, Any], child: str | None = None) -> None:
        """Log (flattened) params to the parent or a child run; keys already logged are skipped."""
        run_id = self._run(child)
        if run_id is None:
            return
        existing = self.client.get_run(run_id).data.params
        flat = {k: v for k, v in _flatten(params).items() if k not in existing}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, child: str | None = None) -> None:
        """Log metrics to the parent or a child run; a NaN (e.g. an AUC with one class present) is logged as NaN."""
        run_id = self._run(child)
        if run_id is None:
            return
        ts = int(time.time() * 1000)
        ms = [mlflow.entities.Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        if ms:
            self.client.log_batch(run_id, metrics=ms)

    def log_artifact(self, path: str | None, artifact_path: str | None = None, child: str | None = None) -> None:
        """Log a file or folder; a missing path is skipped with a warning."""
        run_id = self._run(child)
        if run_id is None or not path:
            return
        if not os.path.exists(path):
            logger.warning("MLflow: artifact %s does not exist, not logged", path)
            return
        if os.path.isdir(path):
            self.client.log_artifacts(run_id, path, artifact_path)
        else:
            self.client.log_artifact(run_id, path, artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        """Terminate the child runs and the parent run."""
        if not self.enabled or self._parent is None:
            return
        for run_id in self._children.values():
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status)
        self.client.set_terminated(self._parent, status)
        self._parent, self._children = None, {}

    def __repr__(self) -> str:
        return f"MLflowTracker(uri={self.tracking_uri!r}, experiment={self.experiment_name!r}, run={self.run_name!r})"


def save_executed_config(path: str, argv: Sequence[str] | None = None) -> str | None:
    """Rebuild the config of this ``python -m monai.bundle run`` call (files + overrides) into ``path``.

    Not ``ConfigWorkflow``'s executed-config saving: MONAI writes that file only under ``--tracking``, which
    this bundle refuses (:func:`refuse_monai_tracking`), so the files and overrides are read back from argv.

    Returns:
        ``path``, or None when the process was not started with ``--config_file`` (e.g. a test).

    Example:
        >>> save_executed_config("out/config.json", ["run", "--config_file", "configs/train.json"])  # doctest: +SKIP
        'out/config.json'
    """
    argv = list(sys.argv if argv is None else argv)
    if "--config_file" not in argv:
        return None
    pairs: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        if argv[i].startswith("--"):
            key = argv[i][2:]
            value: Any = True
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                i += 1
            if isinstance(value, str):
                try:
                    value = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    pass
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            pairs[key] = value
        i += 1
    files = pairs.pop("config_file")
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({k: v for k, v in pairs.items() if k not in _NOT_CONFIG_ARGS})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        ConfigParser.export_config_file(parser.get(), tmp)
    return path
