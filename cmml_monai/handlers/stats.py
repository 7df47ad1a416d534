"""Per-epoch averages of the loss and its components, written into ``engine.state.metrics``."""

from __future__ import annotations

from collections import defaultdict

import torch
from ignite.engine import Engine, Events

__all__ = ["EpochLossAverager"]


class EpochLossAverager:
    """Averages ``loss`` and every ``loss_*`` entry of ``engine.state.output`` over an epoch.

    At ``EPOCH_COMPLETED`` it stores ``{prefix}loss``, ``{prefix}loss_rec``, ... and ``{prefix}lr`` (the
    first param group's learning rate) in ``engine.state.metrics``
    so ``StatsHandler`` prints them and ``MLFlowHandler`` logs them per epoch. Attach it before those.

    Args:
        prefix: name prefix, e.g. ``"train_"``.
    """

    def __init__(self, prefix: str = "train_") -> None:
        self.prefix = prefix
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._complete)

    def _reset(self, engine: Engine) -> None:
        self._sums = defaultdict(float)
        self._count = 0

    def _update(self, engine: Engine) -> None:
        out = engine.state.output
        if isinstance(out, list):  # decollated by postprocessing: the scalars repeat in every item
            out = out[0] if out else {}
        if not isinstance(out, dict):
            return
        self._count += 1
        for key, value in out.items():
            if isinstance(key, str) and key.startswith("loss"):
                self._sums[key] += float(value.item() if isinstance(value, torch.Tensor) else value)

    def _complete(self, engine: Engine) -> None:
        if self._count:
            for key, total in self._sums.items():
                engine.state.metrics[f"{self.prefix}{key}"] = total / self._count
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None and optimizer.param_groups:
            engine.state.metrics[f"{self.prefix}lr"] = float(optimizer.param_groups[0]["lr"])

