"""Early stopping whose state (patience counter, best score, stopped) travels with the checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping

__all__ = ["ResumableEarlyStopHandler"]

logger = logging.getLogger(__name__)


class ResumableEarlyStopHandler:
    """Ignite's ``EarlyStopping`` on the evaluator, bound to the trainer later, and saved in a stage checkpoint.

    Put it in the stage's ``checkpoint_dict`` (``"early_stop": "@train#early_stop"``): its
    ``state_dict`` (``counter``, ``best_score``, ``stopped``) is then saved every epoch and
    ``ResumeHandler`` restores it. A resumed run keeps counting patience from where it was, and a
    run that had already stopped early stays stopped instead of training its remaining epochs.
    Our own handler around Ignite's because a config cannot give the trainer to a handler of its own
    evaluator (a reference cycle) and because ``stopped`` is not part of Ignite's state.

    Attach it to the evaluator (it reads the validation score) and give it the trainer with
    ``set_trainer`` (:class:`cmml_monai.handlers.StageHandlers` does, given ``early_stop``).

    Args:
        patience: validations without improvement before the trainer stops.
        score_function: ``engine -> float``, higher is better (e.g. ``monai.handlers.stopping_fn_from_metric``).
        trainer: the trainer to stop; None: given later with ``set_trainer``.
        min_delta: smallest increase that counts as an improvement.
        cumulative_delta: compare against the best score instead of the last one.
        epoch_level: check at the evaluator's ``EPOCH_COMPLETED`` (else at every iteration).

    Example::

        >>> from monai.handlers import stopping_fn_from_metric
        >>> stop = ResumableEarlyStopHandler(3, stopping_fn_from_metric("val_auc"))
        >>> stop.load_state_dict({"counter": 2, "best_score": 0.8, "stopped": False})
        >>> stop.state_dict()
        {'counter': 2, 'best_score': 0.8, 'stopped': False}
    """

    def __init__(
        self,
        patience: int,
        score_function: Callable[[Engine], float],
        trainer: Engine | None = None,
        min_delta: float = 0.0,
        cumulative_delta: bool = False,
        epoch_level: bool = True,
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"early_stop_patience must be an integer >= 1, got {patience!r}.")
        self.patience = patience
        self.score_function = score_function
        self.min_delta = float(min_delta)
        self.cumulative_delta = bool(cumulative_delta)
        self.epoch_level = bool(epoch_level)
        self.stopped = False
        self.stopper: EarlyStopping | None = None
        self._pending: dict[str, Any] = {"counter": 0, "best_score": None}
        if trainer is not None:
            self.set_trainer(trainer)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED, self)

    def set_trainer(self, trainer: Engine) -> None:
        self.stopper = EarlyStopping(
            self.patience, self.score_function, trainer, threshold=self.min_delta, cumulative=self.cumulative_delta
        )
        self.stopper.counter = int(self._pending["counter"])
        self.stopper.best_score = self._pending["best_score"]
        # after ResumeHandler (attached earlier) has restored the state at STARTED
        trainer.add_event_handler(Events.STARTED, self._stay_stopped)

    def state_dict(self) -> dict[str, Any]:
        if self.stopper is not None:
            counter, best = self.stopper.counter, self.stopper.best_score
        else:
            counter, best = self._pending["counter"], self._pending["best_score"]
        return {"counter": int(counter), "best_score": None if best is None else float(best), "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"counter", "best_score", "stopped"} - set(state)
        if missing:
            raise ValueError(f"early-stop state lacks {sorted(missing)}; got keys {sorted(state)}")
        self.stopped = bool(state["stopped"])
        self._pending = {"counter": int(state["counter"]), "best_score": state["best_score"]}
        if self.stopper is not None:
            self.stopper.counter = self._pending["counter"]
            self.stopper.best_score = self._pending["best_score"]

    def __call__(self, engine: Engine) -> None:
        if self.stopper is None:
            raise RuntimeError("ResumableEarlyStopHandler has no trainer: call set_trainer(trainer) first")
        self.stopper(engine)
        if self.stopper.counter >= self.patience:
            self.stopped = True

    def _stay_stopped(self, trainer: Engine) -> None:
        if self.stopped:
            logger.info(
                "early stopping had already ended this stage at epoch %d; not training further", trainer.state.epoch
            )
            trainer.terminate()
