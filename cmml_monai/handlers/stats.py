"""Per-epoch averages of the loss and its components, written into ``engine.state.metrics``."""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Average

__all__ = ["EpochLossAverager"]


def _iteration_losses(output: Any) -> dict[str, Any]:
    """The ``loss*`` entries of one iteration's ``engine.state.output`` (the first item of a decollated list,
    where every item holds the same scalars)."""
    if isinstance(output, list):
        output = output[0] if output else {}
    if not isinstance(output, dict):
        return {}
    return {k: v for k, v in output.items() if isinstance(k, str) and k.startswith("loss")}


class EpochLossAverager:
    """Epoch means of ``loss`` and every ``loss_*`` entry of ``engine.state.output``, by Ignite's ``Average``.

    One ``ignite.metrics.Average`` per entry, created at the first iteration that has the entry (the
    entries depend on the stage) on the device of its value, so a 0-d device tensor accumulates there
    and the host reads it once per epoch; under several processes ``Average`` reduces over the ranks.
    At ``EPOCH_COMPLETED`` it stores ``{prefix}loss``, ``{prefix}loss_rec``, ... and ``{prefix}lr`` (the
    first param group's learning rate) in ``engine.state.metrics`` so ``StatsHandler`` prints them and
    ``MLFlowHandler`` logs them per epoch. Attach it before those.

    Not Ignite's ``Average.attach``: attached at the first iteration that has an entry, its ``EPOCH_COMPLETED``
    would run after ``StatsHandler``'s and MLflow's, which would log the previous epoch's means.

    Args:
        prefix: name prefix, e.g. ``"train_"``.

    Example::

        >>> EpochLossAverager("train_").attach(trainer)  # doctest: +SKIP
        >>> trainer.state.metrics["train_loss"]  # after an epoch  # doctest: +SKIP
        0.6931
    """

    def __init__(self, prefix: str = "train_") -> None:
        self.prefix = prefix
        self._metrics: dict[str, Average] = {}

    def attach(self, engine: Engine) -> None:
        # one set of handlers drives every Average (Metric.started/update/completed): Metric.attach at the
        # first iteration would append their EPOCH_COMPLETED after StatsHandler's and MLflow's
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        for metric in self._metrics.values():
            metric.started(engine)

    def _iteration_completed(self, engine: Engine) -> None:
        for key, value in _iteration_losses(engine.state.output).items():
            if key not in self._metrics:
                device = value.device if isinstance(value, torch.Tensor) else torch.device("cpu")
                self._metrics[key] = Average(device=device)
            self._metrics[key].update(value)

    def _completed(self, engine: Engine) -> None:
        for key, metric in self._metrics.items():
            if metric.num_examples:  # Average raises on an entry this epoch never had
                metric.completed(engine, f"{self.prefix}{key}")
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None and optimizer.param_groups:
            engine.state.metrics[f"{self.prefix}lr"] = float(optimizer.param_groups[0]["lr"])
