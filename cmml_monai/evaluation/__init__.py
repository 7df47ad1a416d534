"""cmml_monai.evaluation: what is made from trained models, above the engines and handlers.

Owns the missing-rate sweep (``MissingRateSweep``), the comparison and paired tables of several runs
and their pooling over strata, the sweep and ROC plots, and the steps of the training workflow that
the ``run`` list of ``configs/train.json`` calls (they compose engines with the checkpoint and MLflow
handlers, so they live here rather than in ``engines``).
"""

from cmml_monai.evaluation.plots import plot_roc, plot_sweep
from cmml_monai.evaluation.pooled import (
    POOLED_PAIRED_COLUMNS,
    pooled_comparison_table,
    pooled_paired_table,
    read_comparison_folder,
)
from cmml_monai.evaluation.report import (
    comparison_table,
    paired_table,
    read_sweep,
    write_comparison_table,
    write_paired_table,
)
from cmml_monai.evaluation.sweep import SUBSET_COLUMNS, SWEEP_COLUMNS, MissingRateSweep, format_table, predict
from cmml_monai.evaluation.workflow import (
    SERVE_CHOICES,
    bind_output_dir,
    check_serve,
    final_model_path,
    log_run_inputs,
    publish_model,
    run_stage,
)

__all__ = [
    "MissingRateSweep",
    "predict",
    "format_table",
    "SWEEP_COLUMNS",
    "SUBSET_COLUMNS",
    "plot_sweep",
    "plot_roc",
    "read_sweep",
    "comparison_table",
    "write_comparison_table",
    "paired_table",
    "write_paired_table",
    "read_comparison_folder",
    "pooled_comparison_table",
    "pooled_paired_table",
    "POOLED_PAIRED_COLUMNS",
    "run_stage",
    "publish_model",
    "SERVE_CHOICES",
    "bind_output_dir",
    "check_serve",
    "final_model_path",
    "log_run_inputs",
]
