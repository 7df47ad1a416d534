"""The CMML training iteration as a MONAI ``SupervisedTrainer``: ``net.forward_train`` + ``CMMLLoss``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents, engine_apply_transform
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import Decollated
from monai.utils import CommonKeys as Keys
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from cmml_monai.engines.distributed import DistributedTrainNetwork
from cmml_monai.engines.prepare import CMMLPrepareBatch
from cmml_monai.utils import as_bool

__all__ = ["CMMLTrainer", "amp_kwargs", "autocast_context"]


def amp_kwargs(amp: bool, device: torch.device | str) -> dict | None:
    """MONAI's ``amp_kwargs`` of both engines: bf16 autocast on CUDA when ``amp`` is set, else None (AMP off).

    Example:
        >>> amp_kwargs(True, "cuda"), amp_kwargs(True, "cpu")
        ({'dtype': torch.bfloat16}, None)
    """
    if as_bool(amp, "amp") and torch.device(device).type == "cuda":
        return {"dtype": torch.bfloat16}
    return None


def autocast_context(amp: bool, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The engines' autocast outside an engine (e.g. a test recomputing a validation): ``torch.autocast("cuda",
    **amp_kwargs(amp, device))``, a no-op where AMP is off.

    Example:
        >>> isinstance(autocast_context(True, "cpu"), contextlib.nullcontext)
        True
    """
    kwargs = amp_kwargs(amp, device)
    return contextlib.nullcontext() if kwargs is None else torch.autocast("cuda", **kwargs)


_DECOLLATE = Decollated(keys=None, detach=True)


def _decollate_keeping_losses(engine: SupervisedTrainer) -> None:
    """Split ``state.batch`` and ``state.output`` into one item per case with MONAI's public ``Decollated``.

    Not the workflow's own ``decollate=True``: that turns each 0-d loss into a float with ``.item()`` (a host
    sync per term and step); here the loss tensors stay on the device, shared by every item.
    """
    if isinstance(engine.state.batch, (list, dict)):
        engine.state.batch = _DECOLLATE(engine.state.batch)
    output = engine.state.output
    if isinstance(output, dict):
        scalars = {k: v for k, v in output.items() if isinstance(v, torch.Tensor) and v.ndim == 0}
        items = _DECOLLATE({k: v for k, v in output.items() if k not in scalars})
        if isinstance(items, dict):  # nothing with a batch dimension: one item
            engine.state.output = {**items, **scalars}
        else:
            engine.state.output = [{**item, **scalars} for item in items]
    elif isinstance(output, list):
        engine.state.output = _DECOLLATE(output)


def _postprocess(engine: SupervisedTrainer, transform: Callable) -> None:
    """Apply ``transform`` to the (decollated) batch and output, as MONAI's workflows do."""
    if isinstance(engine.state.batch, list) and isinstance(engine.state.output, list):
        for i, (b, o) in enumerate(zip(engine.state.batch, engine.state.output)):
            engine.state.batch[i], engine.state.output[i] = engine_apply_transform(b, o, transform)
    else:
        engine.state.batch, engine.state.output = engine_apply_transform(
            engine.state.batch, engine.state.output, transform
        )


class CMMLTrainer(SupervisedTrainer):
    """One training stage of CMML (or a baseline): ``net.forward_train(image, tabular, stage)`` then
    ``loss_function(outputs, label) -> dict(loss=..., components...)``.

    ``engine.state.output`` holds ``label``, ``pred`` (the logits), ``loss`` and every loss component
    (e.g. ``loss_rec``) as a detached 0-d tensor on the device, so ``EpochLossAverager`` averages them
    there; every item of a decollated output holds the same tensors.

    A step does not wait for the device: the losses are checked for NaN/inf every ``finite_check_interval``
    iterations and at the last iteration of each epoch (one device-to-host copy of the losses since the
    last check), before that iteration's backward. A non-finite loss raises ``FloatingPointError`` naming
    the stage, the iteration and the value, at most ``finite_check_interval - 1`` optimizer steps later, so
    no epoch validates or saves its epoch checkpoint after one (an epoch of unknown length is checked at
    ``EPOCH_COMPLETED``, after the other handlers).

    Args:
        device: device of the network.
        max_epochs: epochs of this stage.
        train_data_loader: loader of batch-contract dicts.
        network: a network with ``forward_train``; under several processes its
            ``DistributedTrainNetwork`` (a bare ``DistributedDataParallel`` would not sync ``forward_train``).
        optimizer: optimizer over ``network.stage_parameters(stage)``.
        loss_function: ``CMMLLoss(stage, multi_label)``.
        stage: 1 (CRTA synthesis) or 2 (alignment + classification).
        amp: bf16 autocast when ``device`` is CUDA (MONAI's ``amp``, ``amp_kwargs``, as the evaluator); off on CPU.
        grad_clip: max gradient norm (0 = off).
        finite_check_interval: iterations between the checks of the loss for NaN/inf (1 = every step).
        postprocessing: transform applied to each decollated item (MONAI's ``postprocessing``).
        decollate: split batch and output into one item per case after each step (MONAI's default); the
            0-d loss tensors are shared by every item instead of copied to the host.
        kwargs: the other ``SupervisedTrainer`` arguments.
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
        finite_check_interval: int = 50,
        inferer: Inferer | None = None,
        prepare_batch: Callable | None = None,
        key_train_metric: dict | None = None,
        train_handlers: Sequence | None = None,
        postprocessing: Callable | None = None,
        decollate: bool = True,
        **kwargs: Any,
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        if (
            isinstance(finite_check_interval, bool)
            or not isinstance(finite_check_interval, int)
            or finite_check_interval < 1
        ):
            raise ValueError(f"finite_check_interval must be an int >= 1, got {finite_check_interval!r}")
        if isinstance(network, torch.nn.parallel.DistributedDataParallel):
            # DDP's hooks run in its forward (the served path); forward_train must go through it
            raise ValueError(
                "network is a DistributedDataParallel: pass cmml_monai.engines.distributed.DistributedTrainNetwork"
                "(network) instead, which runs forward_train under DDP"
            )
        if not hasattr(network, "forward_train"):
            raise ValueError(f"network {type(network).__name__} has no forward_train(image, tabular, stage)")
        autocast_kwargs = amp_kwargs(amp, device)
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
            # decollation and postprocessing are registered below, through Ignite's public events
            postprocessing=None,
            decollate=False,
            amp=autocast_kwargs is not None,
            amp_kwargs=autocast_kwargs,
            **kwargs,
        )
        if decollate:
            self.add_event_handler(IterationEvents.MODEL_COMPLETED, _decollate_keeping_losses)
        if postprocessing is not None:
            self.add_event_handler(IterationEvents.MODEL_COMPLETED, _postprocess, postprocessing)
        self.stage = stage
        self.grad_clip = float(grad_clip)
        self.finite_check_interval = finite_check_interval
        self._unchecked: list[tuple[int, torch.Tensor]] = []  # (iteration, loss) since the last check
        self.add_event_handler(Events.STARTED, self._restrict_grads)
        self.add_event_handler(Events.STARTED, self._forget_unchecked)
        # an epoch of unknown length, or a run terminated inside an epoch, is checked here (after the
        # other handlers); an epoch of known length is checked at its last iteration
        self.add_event_handler(Events.EPOCH_COMPLETED | Events.COMPLETED, self._check_finite)
        if isinstance(network, DistributedTrainNetwork):
            network.attach(self)  # rank 0's buffers to every rank after each optimizer step

    def _restrict_grads(self, engine: CMMLTrainer) -> None:
        """Only the parameters this stage's optimizer steps get gradients (frozen CRTA stays frozen)."""
        stepped = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
        for p in engine.network.parameters():
            p.requires_grad_(id(p) in stepped)

    def _forget_unchecked(self, engine: CMMLTrainer) -> None:
        """Drop losses left unchecked by an earlier run that raised."""
        self._unchecked = []

    def _check_finite(self, engine: CMMLTrainer) -> None:
        """Raise ``FloatingPointError`` at the first non-finite loss since the last check (one host copy)."""
        if not self._unchecked:
            return
        iterations = [i for i, _ in self._unchecked]
        values = torch.stack([v for _, v in self._unchecked]).tolist()
        self._unchecked = []
        for iteration, value in zip(iterations, values):
            if not math.isfinite(value):
                raise FloatingPointError(f"stage {engine.stage}: the loss is {value} at iteration {iteration}")

    def _iteration(self, engine: CMMLTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        image, label, (tabular,), _ = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        engine.state.output = {Keys.LABEL: label}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        # MONAI's SupervisedTrainer autocast; no GradScaler: bf16 keeps fp32's exponent range
        with torch.autocast("cuda", **engine.amp_kwargs) if engine.amp else contextlib.nullcontext():
            outputs = engine.network.forward_train(image, tabular, stage=engine.stage)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            losses = engine.loss_function(outputs, label)
        loss = losses["loss"]
        terms = {
            k: v.detach().float().reshape(())
            for k, v in losses.items()
            if isinstance(v, torch.Tensor) and v.numel() == 1
        }
        self._unchecked.append((engine.state.iteration, terms["loss"]))  # engine is self (MONAI's _iteration)
        epoch_length = engine.state.epoch_length
        if engine.state.iteration % engine.finite_check_interval == 0 or (
            epoch_length is not None and engine.state.iteration % epoch_length == 0
        ):
            self._check_finite(engine)
        engine.state.output[Keys.PRED] = outputs["logits"].detach().float()
        engine.state.output[Keys.LOSS] = terms["loss"]
        for key, value in terms.items():
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
