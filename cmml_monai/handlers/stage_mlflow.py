"""The MLflow handler of one training stage: it logs into the :class:`MLflowTracker`'s nested run for the stage."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from cmml_monai.handlers.mlflow import MLflowTracker
from cmml_monai.utils import as_bool

__all__ = ["StageMLFlowHandler"]


class StageMLFlowHandler(MLFlowHandler):
    """``MLFlowHandler`` that logs into the tracker's nested run for ``stage`` instead of a new run.

    Attach one to a stage's trainer (epoch losses, LR; ``close_on_complete=True``) and one to its
    evaluator (validation metrics, with ``step_engine`` = the trainer so the step is the training epoch).
    With tracking off leave it out: ``configs/train.json`` gives each one ``"_disabled_": "$not @mlflow.enabled"``.

    Args:
        tracker: the shared, enabled ``MLflowTracker``.
        stage: nested run name, e.g. ``"stage1"``.
        step_engine: engine whose epoch is the metric step (default: the attached engine).
        close_on_complete: mark the stage's run finished when the engine completes (after the artifacts
            are logged). Done here through the client rather than by ``MLFlowHandler.close``, which also
            disposes the SQLite engine that the tracker's client still uses.
        kwargs: other ``MLFlowHandler`` arguments (``artifacts``, ...).

    Raises:
        ValueError: the tracker is disabled (a handler without a run to log into).

    Example::

        >>> tracker = MLflowTracker("out", enabled=True)  # doctest: +SKIP
        >>> StageMLFlowHandler(tracker, "stage1", close_on_complete=True).attach(trainer)  # doctest: +SKIP
    """

    def __init__(
        self,
        tracker: MLflowTracker,
        stage: str,
        step_engine: Engine | None = None,
        iteration_log: bool = False,
        output_transform: Callable = lambda x: None,
        artifacts: str | Sequence[Path] | None = None,
        close_on_complete: bool = False,
        **kwargs: Any,
    ) -> None:
        if not tracker.enabled:
            raise ValueError(
                f"StageMLFlowHandler({stage!r}): the MLflow tracker is disabled; leave the handler out "
                '("_disabled_": "$not @mlflow.enabled" in the config)'
            )
        self.tracker = tracker
        self.stage = stage
        self.step_engine = step_engine
        self.finish_on_complete = as_bool(close_on_complete, "close_on_complete")
        super().__init__(
            tracking_uri=tracker.tracking_uri,
            iteration_log=iteration_log,
            output_transform=output_transform,
            experiment_name=tracker.experiment_name,
            run_name=f"{tracker.run_name}/{stage}",
            artifacts=artifacts,
            close_on_complete=False,
            artifact_location=tracker.artifact_location,
            global_epoch_transform=self._step,
            **kwargs,
        )

    def _step(self, epoch: int) -> int:
        return int(self.step_engine.state.epoch) if self.step_engine is not None else int(epoch)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.finish_on_complete:  # after MLFlowHandler's own COMPLETED handler logs the artifacts
            engine.add_event_handler(Events.COMPLETED, self.finish)

    def finish(self, engine: Engine) -> None:
        """Mark the stage's run finished (the tracker's ``close`` ends the parent run)."""
        if self.cur_run is not None:
            self.client.set_terminated(self.cur_run.info.run_id, self.run_finish_status)
            self.cur_run = None

    def start(self, engine: Engine) -> None:
        if self.cur_run is None:
            self.cur_run = self.client.get_run(self.tracker.child_run_id(self.stage))
        super().start(engine)
