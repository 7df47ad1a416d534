"""cmml_monai.handlers: Ignite handlers attached to the engines.

Owns the macro AUC metric handler, MLflow parent/stage runs, checkpoint save/resume/load, early
stopping and epoch loss averages. ``configs/train.json`` lists each stage's handlers, in attach order,
under ``stage1#handlers`` / ``stage1#val_handlers`` and ``stage2#handlers`` / ``stage2#val_handlers``
(docs/training.md has the table). Handlers use the layers below (``metrics``, ``engines``, ``data``,
``utils``); the sweep, reports and plots that consume their outputs live in ``evaluation``.
"""

from cmml_monai.handlers.averaging import WeightAverager
from cmml_monai.handlers.checkpoint import (
    BestCheckpointSaver,
    LoadNetworkHandler,
    ResumeHandler,
    StageCheckpointSaver,
    latest_checkpoint,
)
from cmml_monai.handlers.early_stop import ResumableEarlyStopHandler
from cmml_monai.handlers.metrics import MacroAUC
from cmml_monai.handlers.mlflow import (
    MLflowTracker,
    refuse_monai_tracking,
    resolve_tracking_uri,
    save_executed_config,
)
from cmml_monai.handlers.rng import RandomState
from cmml_monai.handlers.stage_mlflow import StageMLFlowHandler
from cmml_monai.handlers.stats import EpochLossAverager

__all__ = [
    "WeightAverager",
    "MacroAUC",
    "MLflowTracker",
    "StageMLFlowHandler",
    "resolve_tracking_uri",
    "save_executed_config",
    "refuse_monai_tracking",
    "ResumeHandler",
    "StageCheckpointSaver",
    "BestCheckpointSaver",
    "ResumableEarlyStopHandler",
    "LoadNetworkHandler",
    "RandomState",
    "latest_checkpoint",
    "EpochLossAverager",
]
