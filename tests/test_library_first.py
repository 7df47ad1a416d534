"""Where a handler or helper of ours stands in for MONAI's or Ignite's, the difference its docstring names.

Each test runs the library's piece and ours on the same input and asserts what differs (issue #30:
library first, or one line saying what the library cannot do, tested).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import ROCAUC, CheckpointSaver, EarlyStopHandler, stopping_fn_from_metric
from monai.metrics import compute_roc_auc
from monai.optimizers import WarmupCosineSchedule

from cmml_monai.engines import cosine_scheduler
from cmml_monai.handlers import BestCheckpointSaver, MacroAUC, ResumableEarlyStopHandler, StageCheckpointSaver
from cmml_monai.metrics import macro_auc


def _epoch_lrs(scheduler, optimizer, epochs: int) -> list[float]:
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    return lrs


def test_cosine_scheduler_against_monai_warmup_cosine():
    """The warm-up is MONAI's (``warmup_multiplier`` = our start factor); the cosine is scaled between the LR
    and its floor instead of falling to 0 and clipping at ``end_lr``, so the default job's LRs stay."""
    epochs, warmup, floor = 6, 2, 0.01
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ours = _epoch_lrs(cosine_scheduler(ours_opt, epochs, floor, warmup, 0.1), ours_opt, epochs)
    monai_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    monai = _epoch_lrs(
        WarmupCosineSchedule(monai_opt, warmup, epochs, end_lr=floor, warmup_multiplier=0.1), monai_opt, epochs
    )
    assert ours[:warmup] == pytest.approx(monai[:warmup])  # 0.1, 0.55
    # after the warm-up: ours = floor + (1 - floor) * MONAI's raw cosine
    assert ours[warmup:] == pytest.approx([floor + (1 - floor) * v for v in monai[warmup:]])
    assert ours[-1] != pytest.approx(monai[-1], abs=1e-4)  # 0.1547 against 0.1464: a different schedule


def test_macro_auc_skips_an_absent_class_where_monai_gives_nan():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    labels = torch.tensor([0, 1, 0, 1])  # class 2 absent
    assert math.isnan(compute_roc_auc(probs, torch.nn.functional.one_hot(labels, 3), average="macro"))
    assert macro_auc(probs, labels) == (1.0, [2])
    assert isinstance(ROCAUC(), type(MacroAUC()).__mro__[1])  # both are MONAI IgniteMetricHandlers
    with pytest.raises(ValueError, match=r"^AUC: label 3 is outside the 3 classes \[0, 2\]"):
        macro_auc(probs, torch.tensor([0, 1, 3, 1]))


def test_early_stop_state_where_monai_has_none():
    score = stopping_fn_from_metric("val_auc")
    assert not hasattr(EarlyStopHandler(2, score), "state_dict")
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    stop = ResumableEarlyStopHandler(2, score)
    assert isinstance(stop, EarlyStopHandler)
    stop.load_state_dict({"counter": 1, "best_score": 0.9, "stopped": False})
    stop.set_trainer(trainer)
    evaluator.state.metrics = {"val_auc": 0.5}
    stop(evaluator)  # the restored counter reaches the patience: the trainer would stop
    assert stop.state_dict() == {"counter": 2, "best_score": 0.9, "stopped": True}
    with pytest.raises(RuntimeError, match="set_trainer"):
        ResumableEarlyStopHandler(2, score)(evaluator)


def _validated_engine(scores: list[float], network: torch.nn.Module) -> Engine:
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def validate(e):  # marks the weights with the epoch, then the score the savers read
        network.weight.data.fill_(float(e.state.epoch))
        e.state.metrics = {"val_auc": scores[e.state.epoch - 1]}
        e.state.key_metric_name = "val_auc"

    return engine


def test_best_checkpoint_skips_the_warmup_epoch_where_monai_keeps_it(tmp_path):
    scores = [0.9, 0.6, 0.8, 0.7]  # epoch 1 is a lucky warm-up
    saved = {}
    for name in ("monai", "ours"):
        network = torch.nn.Linear(1, 1, bias=False)
        engine = _validated_engine(scores, network)
        folder = str(tmp_path / name)
        if name == "monai":
            CheckpointSaver(
                folder, {"network": network}, save_key_metric=True, key_metric_filename="model_best.pt"
            ).attach(engine)
        else:
            BestCheckpointSaver(folder, {"network": network}, min_epoch=2).attach(engine)
        engine.run([0], max_epochs=len(scores))
        state = torch.load(os.path.join(folder, "model_best.pt"), weights_only=True)
        saved[name] = state.get("network", state)["weight"].item()
    assert saved == {"monai": 1.0, "ours": 3.0}


def test_epoch_checkpoints_of_an_earlier_run_are_removed_where_ignite_keeps_them(tmp_path):
    for name in ("ignite", "ours"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "checkpoint_epoch=5.pt").write_bytes(b"a killed run's later epoch")
        engine = Engine(lambda e, b: None)
        state = {"network": torch.nn.Linear(1, 1), "optimizer": torch.nn.Linear(1, 1)}  # two: "checkpoint_..."
        if name == "ignite":
            saver = Checkpoint(
                state,
                DiskSaver(str(folder), require_empty=False),
                score_function=lambda e: e.state.epoch,
                score_name="epoch",
                n_saved=1,
            )
            engine.add_event_handler(Events.EPOCH_COMPLETED, saver)
        else:
            StageCheckpointSaver(str(folder), state, save_final=False).attach(engine)
        engine.run([0], max_epochs=1)
        assert sorted(os.listdir(folder)) == (
            ["checkpoint_epoch=1.pt", "checkpoint_epoch=5.pt"] if name == "ignite" else ["checkpoint_epoch=1.pt"]
        )
