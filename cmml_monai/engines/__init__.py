"""cmml_monai.engines: the Ignite trainers and evaluators of the two CMML stages and what builds them.

Owns the trainer and evaluator, batch preparation (NaN for missing inputs), stage optimizers,
schedulers and epoch budgets. Engines use ``data``, ``networks``, ``losses`` and ``metrics``;
handlers attach to them from the layer above.
"""

from cmml_monai.engines.evaluator import CMMLEvaluator
from cmml_monai.engines.optim import (
    STAGE_PLANS,
    cosine_scheduler,
    stage_epochs,
    stage_optimizer,
    stage_parameter_groups,
)
from cmml_monai.engines.prepare import CMMLPrepareBatch
from cmml_monai.engines.trainer import CMMLTrainer, amp_kwargs, autocast_context

__all__ = [
    "CMMLTrainer",
    "CMMLEvaluator",
    "CMMLPrepareBatch",
    "amp_kwargs",
    "autocast_context",
    "stage_optimizer",
    "stage_parameter_groups",
    "cosine_scheduler",
    "STAGE_PLANS",
    "stage_epochs",
]
