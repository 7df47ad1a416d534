"""The CMML training iteration as a MONAI ``SupervisedTrainer``: ``net.forward_train`` + ``CMMLLoss``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer, SimpleInferer
from monai.utils import CommonKeys as Keys
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from cmml_monai.engines.distributed import DistributedTrainNetwork
from cmml_monai.engines.prepare import CMMLPrepareBatch
from cmml_monai.utils import as_bool

__all__ = ["CMMLTrainer", "autocast_context"]


def autocast_context(amp: bool, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``amp`` is set; a no-op on CPU (one code path for both)."""
    device = torch.device(device)
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class CMMLTrainer(SupervisedTrainer):
    """One training stage of CMML (or a baseline): ``net.forward_train(image, tabular, stage)`` then
    ``loss_function(outputs, label) -> dict(loss=..., components...)``.

    ``engine.state.output`` holds ``label``, ``pred`` (the logits), ``loss`` and every loss component
    as a float (e.g. ``loss_rec``), so ``StatsHandler`` / ``EpochLossAverager`` / MLflow can log them.

    Args:
        device: device of the network.
        max_epochs: epochs of this stage.
        train_data_loader: loader of batch-contract dicts.
        network: a network with ``forward_train``; under several processes its
            ``DistributedTrainNetwork`` (a bare ``DistributedDataParallel`` would not sync ``forward_train``).
        optimizer: optimizer over ``network.stage_parameters(stage)``.
        loss_function: ``CMMLLoss(stage, multi_label)``.
        stage: 1 (CRTA synthesis) or 2 (alignment + classification).
        amp: bf16 autocast when running on CUDA; ignored on CPU.
        grad_clip: max gradient norm (0 = off).
        kwargs: the other ``SupervisedTrainer`` arguments (handlers, postprocessing, key metric, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: torch.nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        stage: int = 2,
        amp: bool = False,
        grad_clip: float = 0.0,
        inferer: Inferer | None = None,
        prepare_batch: Callable | None = None,
        key_train_metric: dict | None = None,
        train_handlers: Sequence | None = None,
        postprocessing: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        if isinstance(network, torch.nn.parallel.DistributedDataParallel):
            # DDP's hooks run in its forward (the served path); forward_train must go through it
            raise ValueError(
                "network is a DistributedDataParallel: pass cmml_monai.engines.distributed.DistributedTrainNetwork"
                "(network) instead, which runs forward_train under DDP"
            )
        if not hasattr(network, "forward_train"):
            raise ValueError(f"network {type(network).__name__} has no forward_train(image, tabular, stage)")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            inferer=inferer or SimpleInferer(),
            prepare_batch=prepare_batch or CMMLPrepareBatch(),
            key_train_metric=key_train_metric,
            train_handlers=train_handlers,
            postprocessing=postprocessing,
            amp=False,
            **kwargs,
        )
        self.stage = stage
        self.use_amp = as_bool(amp, "amp")
        self.grad_clip = float(grad_clip)
        self.add_event_handler(Events.STARTED, self._restrict_grads)
        if isinstance(network, DistributedTrainNetwork):
            network.attach(self)  # rank 0's buffers to every rank after each optimizer step

    def _restrict_grads(self, engine: CMMLTrainer) -> None:
        """Only the parameters this stage's optimizer steps get gradients (frozen CRTA stays frozen)."""
        stepped = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
        for p in engine.network.parameters():
            p.requires_grad_(id(p) in stepped)

    def _iteration(self, engine: CMMLTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        image, label, (tabular,), _ = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        engine.state.output = {Keys.LABEL: label}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with autocast_context(engine.use_amp, engine.state.device):
            outputs = engine.network.forward_train(image, tabular, stage=engine.stage)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            losses = engine.loss_function(outputs, label)
        loss = losses["loss"]
        terms = {k: v for k, v in losses.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        # one device-to-host copy per step for the finiteness check and every logged term
        values = dict(zip(terms, torch.stack([v.detach().float().reshape(()) for v in terms.values()]).tolist()))
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(
                f"stage {engine.stage}: the loss is {values['loss']} at iteration {engine.state.iteration}"
            )
        engine.state.output[Keys.PRED] = outputs["logits"].detach().float()
        engine.state.output[Keys.LOSS] = loss.detach()
        for key, value in values.items():
            if key != "loss":
                engine.state.output[key if key.startswith("loss") else f"loss_{key}"] = value
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if engine.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for g in engine.optimizer.param_groups for p in g["params"]], engine.grad_clip
            )
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
