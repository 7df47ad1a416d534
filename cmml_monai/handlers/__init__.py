"""cmml_monai.handlers: macro AUC metric, MLflow parent/stage runs, resume, early stopping, loss averages, plots."""

from cmml_monai.handlers.averaging import WeightAverager
from cmml_monai.handlers.checkpoint import (
    BestCheckpointSaver,
    LoadNetworkHandler,
    ResumeHandler,
    StageCheckpointSaver,
    latest_checkpoint,
)
from cmml_monai.handlers.early_stop import ResumableEarlyStopHandler
from cmml_monai.handlers.metrics import MacroAUC, MacroAUCMetric
from cmml_monai.handlers.mlflow import MLflowTracker, StageMLFlowHandler, resolve_tracking_uri, save_executed_config
from cmml_monai.handlers.plots import plot_roc, plot_sweep
from cmml_monai.handlers.pooled import pooled_comparison_table, pooled_paired_table, read_comparison_folder
from cmml_monai.handlers.report import (
    comparison_table,
    paired_table,
    read_sweep,
    write_comparison,
    write_comparison_table,
    write_paired,
    write_paired_table,
)
from cmml_monai.handlers.stats import BindTrainer, EpochLossAverager

__all__ = [
    "WeightAverager",
    "MacroAUC",
    "MacroAUCMetric",
    "MLflowTracker",
    "StageMLFlowHandler",
    "resolve_tracking_uri",
    "save_executed_config",
    "ResumeHandler",
    "StageCheckpointSaver",
    "BestCheckpointSaver",
    "BindTrainer",
    "ResumableEarlyStopHandler",
    "LoadNetworkHandler",
    "latest_checkpoint",
    "EpochLossAverager",
    "plot_sweep",
    "plot_roc",
    "read_sweep",
    "comparison_table",
    "write_comparison",
    "write_comparison_table",
    "paired_table",
    "write_paired",
    "write_paired_table",
    "read_comparison_folder",
    "pooled_comparison_table",
    "pooled_paired_table",
]
