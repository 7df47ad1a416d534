"""Evaluation as a MONAI ``SupervisedEvaluator``: the served path ``net(image, tabular)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer, SimpleInferer
from torch.utils.data import DataLoader

from cmml_monai.engines.prepare import CMMLPrepareBatch
from cmml_monai.engines.trainer import amp_kwargs

__all__ = ["CMMLEvaluator"]


class CMMLEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` that feeds ``network(image, tabular)`` and uses bf16 autocast on CUDA only.

    Args:
        device: device of the network.
        val_data_loader: loader of batch-contract dicts.
        network: the served network.
        amp: bf16 autocast when ``device`` is CUDA; ignored on CPU.
        prepare_batch: defaults to ``CMMLPrepareBatch``.
        kwargs: the other ``SupervisedEvaluator`` arguments (key metric, handlers, postprocessing, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: DataLoader,
        network: torch.nn.Module,
        amp: bool = False,
        inferer: Inferer | None = None,
        prepare_batch: Callable | None = None,
        key_val_metric: dict | None = None,
        val_handlers: Sequence | None = None,
        postprocessing: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        autocast_kwargs = amp_kwargs(amp, device)  # the trainer's AMP settings
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            inferer=inferer or SimpleInferer(),
            prepare_batch=prepare_batch or CMMLPrepareBatch(),
            key_val_metric=key_val_metric,
            val_handlers=val_handlers,
            postprocessing=postprocessing,
            amp=autocast_kwargs is not None,
            amp_kwargs=autocast_kwargs,
            **kwargs,
        )
