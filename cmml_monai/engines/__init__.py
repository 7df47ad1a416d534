"""cmml_monai.engines: Ignite trainers / evaluators of the two CMML stages, optimizers, methods, the sweep."""

from cmml_monai.engines.evaluator import CMMLEvaluator
from cmml_monai.engines.methods import METHODS, build_network, stage_epochs
from cmml_monai.engines.metrics import classification_metrics, expected_calibration_error, macro_auc
from cmml_monai.engines.optim import cosine_scheduler, stage_optimizer, stage_parameter_groups
from cmml_monai.engines.prepare import CMMLPrepareBatch, MaskedPrepareBatch
from cmml_monai.engines.setup import DatasetInfo, dataset_summary, fit_schema, load_cases
from cmml_monai.engines.sweep import MissingRateSweep
from cmml_monai.engines.trainer import CMMLTrainer, autocast_context
from cmml_monai.engines.workflow import (
    SERVE_CHOICES,
    bind_output_dir,
    check_serve,
    final_model_path,
    log_run_inputs,
    publish_model,
    run_stage,
)

__all__ = [
    "CMMLTrainer",
    "CMMLEvaluator",
    "CMMLPrepareBatch",
    "MaskedPrepareBatch",
    "autocast_context",
    "stage_optimizer",
    "stage_parameter_groups",
    "cosine_scheduler",
    "METHODS",
    "build_network",
    "stage_epochs",
    "macro_auc",
    "classification_metrics",
    "expected_calibration_error",
    "load_cases",
    "fit_schema",
    "DatasetInfo",
    "dataset_summary",
    "MissingRateSweep",
    "run_stage",
    "bind_output_dir",
    "publish_model",
    "SERVE_CHOICES",
    "check_serve",
    "final_model_path",
    "log_run_inputs",
]
