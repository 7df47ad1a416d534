"""Exponential moving average (EMA) of the network's weights, for validation and the served model.

On a few hundred cases the weights of the last steps differ a lot from seed to seed and from epoch
to epoch; an average over recent steps is a flatter, steadier model. Ignite's ``EMAHandler`` keeps
the average; :class:`WeightAverager` adds what a two-stage, resumable bundle needs around it: a
switch (momentum 0 = off, the network itself is validated and served), a restart of the average at
the weights a stage starts from, and a ``state_dict`` for the stage checkpoints.
"""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler

__all__ = ["WeightAverager"]


class WeightAverager:
    """EMA of ``network``'s parameters, updated after every training iteration.

    ``model`` is what validation scores and the best checkpoint saves: the averaged copy when
    ``momentum > 0``, else ``network`` itself. Buffers (BatchNorm statistics, CMML's memory banks and
    flags) are shared with the live network, as Ignite's ``handle_buffers="copy"`` does.

    Attach it to the trainer after the handlers that load weights at ``STARTED`` (resume, the
    stage-1 initialisation of stage 2): a fresh stage restarts the average at the loaded weights; a
    resumed stage keeps the average saved in its checkpoint (put the averager in the checkpoint dict).

    Args:
        network: the trained network.
        momentum: weight of the newest weights in each update, in ``[0, 1)``; 0 turns averaging off.
            The average spans about ``1 / momentum`` iterations.

    Example:
        >>> averager = WeightAverager(net, momentum=0.05)  # doctest: +SKIP
        >>> averager.attach(trainer)  # doctest: +SKIP
        >>> evaluator = CMMLEvaluator(device, loader, averager.model, ...)  # doctest: +SKIP
    """

    def __init__(self, network: torch.nn.Module, momentum: float = 0.0) -> None:
        momentum = float(momentum)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1) (0 = off), got {momentum}")
        self.network = network
        self.momentum = momentum
        self.ema = EMAHandler(network, momentum=momentum, handle_buffers="copy") if momentum > 0 else None

    @property
    def model(self) -> torch.nn.Module:
        """The network to validate and serve."""
        return self.network if self.ema is None else self.ema.ema_model

    def attach(self, engine: Engine) -> None:
        if self.ema is None:
            return
        engine.add_event_handler(Events.STARTED, self._restart)
        self.ema.attach(engine, name="ema_momentum")

    def _restart(self, engine: Engine) -> None:
        if engine.state.iteration == 0:  # a fresh stage; a resumed one restored its average
            self.model.load_state_dict(self.network.state_dict())

    def state_dict(self) -> dict:
        return {} if self.ema is None else self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None and state:
            self.model.load_state_dict(state)
