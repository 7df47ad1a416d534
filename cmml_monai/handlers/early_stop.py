"""Early stopping whose state (patience counter, best score, stopped) travels with the checkpoints."""

from __future__ import annotations

import logging
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import EarlyStopHandler

__all__ = ["ResumableEarlyStopHandler"]

logger = logging.getLogger(__name__)


class ResumableEarlyStopHandler(EarlyStopHandler):
    """``monai.handlers.EarlyStopHandler`` that can be saved in a stage checkpoint and restored.

    Put it in the stage's ``checkpoint_dict`` (``"early_stop": "@train#early_stop"``): its
    ``state_dict`` (``counter``, ``best_score``, ``stopped``) is then saved every epoch and
    ``ResumeHandler`` restores it. A resumed run keeps counting patience from where it was, and a
    run that had already stopped early stays stopped instead of training its remaining epochs.

    Attach it to the evaluator (it reads the validation score) and give it the trainer with
    ``set_trainer`` (:class:`cmml_monai.handlers.StageHandlers` does, given ``early_stop``).

    Args:
        patience, score_function, trainer, min_delta, cumulative_delta, epoch_level: see
            ``monai.handlers.EarlyStopHandler``.

    Example::

        >>> from monai.handlers import stopping_fn_from_metric
        >>> stop = ResumableEarlyStopHandler(3, stopping_fn_from_metric("val_auc"))
        >>> stop.load_state_dict({"counter": 2, "best_score": 0.8, "stopped": False})
        >>> stop.state_dict()
        {'counter': 2, 'best_score': 0.8, 'stopped': False}
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.stopped = False
        self._pending: dict[str, Any] | None = None
        super().__init__(*args, **kwargs)

    def set_trainer(self, trainer: Engine) -> None:
        super().set_trainer(trainer)
        if self._pending is not None:
            self._apply(self._pending)
        # after ResumeHandler (attached earlier) has restored the state at STARTED
        trainer.add_event_handler(Events.STARTED, self._stay_stopped)

    def _apply(self, state: dict[str, Any]) -> None:
        self._handler.counter = int(state["counter"])
        self._handler.best_score = state["best_score"]

    def state_dict(self) -> dict[str, Any]:
        if self._handler is not None:
            counter, best = self._handler.counter, self._handler.best_score
        elif self._pending is not None:
            counter, best = self._pending["counter"], self._pending["best_score"]
        else:
            counter, best = 0, None
        return {"counter": int(counter), "best_score": None if best is None else float(best), "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"counter", "best_score", "stopped"} - set(state)
        if missing:
            raise ValueError(f"early-stop state lacks {sorted(missing)}; got keys {sorted(state)}")
        self.stopped = bool(state["stopped"])
        if self._handler is None:
            self._pending = dict(state)
        else:
            self._apply(state)

    def __call__(self, engine: Engine) -> None:
        super().__call__(engine)
        if self._handler.counter >= self._handler.patience:
            self.stopped = True

    def _stay_stopped(self, trainer: Engine) -> None:
        if self.stopped:
            logger.info("early stopping had already ended this stage at epoch %d; not training further",
                        trainer.state.epoch)
            trainer.terminate()
