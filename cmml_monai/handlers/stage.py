"""The handler lists of one training stage, so ``configs/train.json`` writes each stage's differences once.

Both CMML stages (and a baseline's single stage) attach the same handlers in the same order; only the
stage name, its checkpoint folder and the stage-2 extras (start from the stage-1 weights, early stop)
differ. :class:`StageHandlers` is the trainer's list, :class:`ValidationHandlers` the evaluator's.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar
from monai.handlers import LrScheduleHandler, StatsHandler, ValidationHandler, from_engine

from cmml_monai.handlers.averaging import WeightAverager
from cmml_monai.handlers.checkpoint import BestCheckpointSaver, LoadNetworkHandler, ResumeHandler, StageCheckpointSaver
from cmml_monai.handlers.early_stop import ResumableEarlyStopHandler
from cmml_monai.handlers.mlflow import MLflowTracker, StageMLFlowHandler
from cmml_monai.handlers.stats import EpochLossAverager
from cmml_monai.utils import as_bool

__all__ = ["StageHandlers", "ValidationHandlers", "STAGE_NAMES"]

#: the stage names: checkpoint sub-folders' MLflow run names and log tags
STAGE_NAMES = ("stage1", "stage2")


def _check_stage(stage: str) -> str:
    if stage not in STAGE_NAMES:
        raise ValueError(f"stage must be one of {STAGE_NAMES}, got {stage!r}")
    return stage


class StageHandlers:
    """The trainer handlers of one stage, attached in the order their events need.

    The order is: resume the stage's last checkpoint; load the earlier stage's weights (``init_from``,
    stage 2 only, after the resume so a resumed stage keeps its own weights); the weight average
    (after every weight load, so it restarts from the loaded weights); the epoch loss averages (before
    the logs read them); validation (it scores the averaged weights); the LR step; the epoch
    checkpoint (after validation, so the best score and early-stop counter it holds are this epoch's);
    the logs; and last the early stop's trainer binding.

    The stage's checkpoint holds ``network``, ``averager``, ``optimizer``, ``lr_scheduler``, ``best``,
    ``early_stop`` (when given), ``rng`` (when given) and the trainer; the resume restores them all.

    Args:
        stage: ``"stage1"`` or ``"stage2"``: the MLflow nested run and the loss log tag.
        checkpoint_dir: the stage's checkpoint folder.
        network: the trained network (the stage's checkpoint and ``init_from`` load into it).
        optimizer: the stage's optimizer.
        lr_scheduler: its scheduler, stepped once per epoch.
        averager: the stage's :class:`WeightAverager`.
        best_saver: the stage's :class:`BestCheckpointSaver` (its state travels with the checkpoint).
        validator: the stage's evaluator, run every ``interval`` epochs.
        tracker: the run's ``MLflowTracker`` (nothing is logged to MLflow when it is disabled).
        rng: a :class:`cmml_monai.handlers.RandomState` saved with the checkpoint, or None.
        early_stop: the stage's :class:`ResumableEarlyStopHandler` (on the evaluator); bound to the trainer here.
        init_from: an earlier stage's checkpoint folder whose weights a fresh stage starts from, or None.
        interval: validation interval in epochs.
        resume: resume from the stage's last checkpoint when there is one.
        progress_bar: show Ignite's progress bar.

    Example:
        >>> handlers = StageHandlers("stage1", "out/stage1", net, opt, sched, averager, best, evaluator,
        ...                          tracker)  # doctest: +SKIP
        >>> trainer = CMMLTrainer(..., train_handlers=[handlers])  # doctest: +SKIP
        >>> handlers.resume.loaded_from  # doctest: +SKIP
        'out/stage1/checkpoint_epoch=2.pt'
    """

    def __init__(
        self,
        stage: str,
        checkpoint_dir: str,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        averager: WeightAverager,
        best_saver: BestCheckpointSaver,
        validator: Engine,
        tracker: MLflowTracker,
        rng: Any = None,
        early_stop: ResumableEarlyStopHandler | None = None,
        init_from: str | None = None,
        interval: int = 1,
        resume: bool = True,
        progress_bar: bool = True,
    ) -> None:
        self.stage = _check_stage(stage)
        # one dict for the saver and the resume: both add the trainer to it when attached
        state: dict[str, Any] = {
            "network": network,
            "averager": averager,
            "optimizer": optimizer,
            "lr_scheduler": lr_scheduler,
            "best": best_saver,
        }
        if early_stop is not None:
            state["early_stop"] = early_stop
        if rng is not None:
            state["rng"] = rng
        self.checkpoint = state
        self.resume = ResumeHandler(checkpoint_dir, state, enabled=resume)
        self.init = LoadNetworkHandler(init_from, network) if init_from is not None else None
        self.handlers: list[Any] = [self.resume]
        if self.init is not None:
            self.handlers.append(self.init)
        self.handlers += [
            averager,
            EpochLossAverager(prefix="train_"),
            ValidationHandler(validator=validator, interval=interval, epoch_level=True),
            LrScheduleHandler(lr_scheduler, print_lr=False),
            StageCheckpointSaver(checkpoint_dir, state),
            StatsHandler(
                name="cmml",
                tag_name=f"{stage}_loss",
                iteration_log=False,
                output_transform=from_engine(["loss"], first=True),
            ),
            StageMLFlowHandler(
                tracker, stage, artifacts=os.path.join(checkpoint_dir, best_saver.filename), close_on_complete=True
            ),
            ProgressBar(persist=False, disable=not as_bool(progress_bar, "progress_bar")),
        ]
        self.early_stop = early_stop

    def attach(self, engine: Engine) -> None:
        """Attach every handler to the stage's trainer, in order."""
        for handler in self.handlers:
            handler.attach(engine)
        if self.early_stop is not None:
            # the early stop runs on the evaluator but stops this trainer
            self.early_stop.set_trainer(engine)


class ValidationHandlers:
    """The evaluator handlers of one stage, attached in order: the log, the best checkpoint, MLflow, then
    the early stop (which reads the score after the best checkpoint is saved).

    One object in the evaluator's ``val_handlers`` list, so the list stays a list that tools patching a
    bundle (MONAI's ``--tracking``) can append to.

    Args:
        stage: ``"stage1"`` or ``"stage2"``: the MLflow nested run the validation metrics go to.
        best_saver: the stage's :class:`BestCheckpointSaver`.
        tracker: the run's ``MLflowTracker``.
        early_stop: the stage's early stop, or None.

    Example:
        >>> handlers = ValidationHandlers("stage2", best_saver, tracker, early_stop)  # doctest: +SKIP
        >>> [type(h).__name__ for h in handlers.handlers]  # doctest: +SKIP
        ['StatsHandler', 'BestCheckpointSaver', 'StageMLFlowHandler', 'ResumableEarlyStopHandler']
    """

    def __init__(
        self,
        stage: str,
        best_saver: BestCheckpointSaver,
        tracker: MLflowTracker,
        early_stop: ResumableEarlyStopHandler | None = None,
    ) -> None:
        self.handlers: list[Any] = [
            StatsHandler(name="cmml", iteration_log=False),
            best_saver,
            StageMLFlowHandler(tracker, _check_stage(stage)),
        ]
        if early_stop is not None:
            self.handlers.append(early_stop)

    def attach(self, engine: Engine) -> None:
        for handler in self.handlers:
            handler.attach(engine)
