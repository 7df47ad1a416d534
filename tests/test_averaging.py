"""WeightAverager: EMA of the weights on a real Ignite engine, restart, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from cmml_monai.handlers import WeightAverager


def _engine(net: torch.nn.Module, steps: list[float]) -> Engine:
    """An engine whose iteration i sets the only weight to steps[i] (so the EMA is known by hand)."""

    def step(engine: Engine, batch: int) -> None:
        with torch.no_grad():
            net.weight.fill_(steps[engine.state.iteration - 1])

    return Engine(step)


def test_average_is_the_hand_computed_ema_and_restarts_at_the_start_weights() -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(5.0)
    averager = WeightAverager(net, momentum=0.5)
    with torch.no_grad():
        net.weight.fill_(2.0)  # e.g. stage 2 loading stage 1's weights after the averager was built
    steps = [4.0, 8.0, 0.0]
    engine = _engine(net, steps)
    averager.attach(engine)
    engine.run(range(3), max_epochs=1)
    expected = 2.0  # restarted at the weights the stage started from, not at 5.0
    for w in steps:
        expected = 0.5 * expected + 0.5 * w
    assert averager.model is not net
    assert averager.model.weight.item() == pytest.approx(expected)  # 3.5
    assert net.weight.item() == 0.0


def test_resumed_stage_keeps_its_saved_average() -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    averager = WeightAverager(net, momentum=0.5)
    saved = {"weight": torch.tensor([[7.0]])}
    averager.load_state_dict(saved)
    engine = _engine(net, [0.0, 0.0, 0.0, 1.0, 1.0, 3.0])
    averager.attach(engine)
    # a resumed engine starts past iteration 0 (here after epoch 1): the loaded average must not be reset
    engine.state.iteration, engine.state.epoch, engine.state.max_epochs = 3, 1, 2
    engine.run(range(3), max_epochs=2)
    expected = 7.0
    for w in (1.0, 1.0, 3.0):
        expected = 0.5 * expected + 0.5 * w
    assert averager.model.weight.item() == pytest.approx(expected)
    assert torch.equal(averager.state_dict()["weight"], averager.model.weight)


def test_momentum_zero_is_off_and_bad_momentum_raises() -> None:
    net = torch.nn.Linear(2, 2)
    averager = WeightAverager(net, momentum=0.0)
    assert averager.model is net and averager.state_dict() == {}
    averager.load_state_dict({})  # a checkpoint written with averaging off loads
    engine = _engine(torch.nn.Linear(1, 1, bias=False), [1.0])
    averager.attach(engine)
    assert not engine.has_event_handler(averager._restart)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ema_momentum must be in"):
            WeightAverager(net, momentum=bad)


def test_buffers_follow_the_live_network() -> None:
    net = torch.nn.BatchNorm1d(3)
    averager = WeightAverager(net, momentum=0.1)

    def step(engine: Engine, batch: int) -> None:
        net.train()
        net(torch.randn(8, 3) + 4.0)  # moves the running mean

    engine = Engine(step)
    averager.attach(engine)
    engine.run(range(2), max_epochs=1)
    assert torch.equal(averager.model.running_mean, net.running_mean)
    assert net.running_mean.abs().sum() > 0
