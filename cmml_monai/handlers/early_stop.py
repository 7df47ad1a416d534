"""Early stopping whose state (patience counter, best score, stopped) travels with the checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping
from monai.handlers import EarlyStopHandler

__all__ = ["ResumableEarlyStopHandler"]

logger = logging.getLogger(__name__)


class ResumableEarlyStopHandler(EarlyStopHandler):
    """MONAI's ``EarlyStopHandler`` (on the evaluator, bound to the trainer with ``set_trainer``) with a ``state_dict``.

    MONAI's handler keeps Ignite's ``EarlyStopping`` unexposed and has no ``state_dict``, so a resumed run
    restarts its patience and a stopped stage trains again; this subclass holds it as ``stopper`` and saves
    ``counter``, ``best_score`` and ``stopped``.

    Put it in the stage's checkpoint dict (``"early_stop": "@stage2#early_stop"``): the epoch checkpoints
    then carry its state and ``ResumeHandler`` restores it, so a resumed run keeps counting patience from
    where it was, and a run that had already stopped early stays stopped. Attach it to the evaluator (it
    reads the validation score); ``configs/train.json`` binds the trainer in ``run`` with
    ``"$@stage2#early_stop.set_trainer(@stage2#trainer)"`` (a ``trainer`` argument would be a reference
    cycle: the trainer's handlers build the evaluator, whose handlers hold this one).

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
        self.stopped = False
        self.stopper: EarlyStopping | None = None
        self.pending: dict[str, Any] = {"counter": 0, "best_score": None}
        super().__init__(
            patience,
            score_function,
            trainer=trainer,
            min_delta=float(min_delta),
            cumulative_delta=bool(cumulative_delta),
            epoch_level=bool(epoch_level),
        )

    def set_trainer(self, trainer: Engine) -> None:
        """Bind the trainer to stop; the state loaded so far carries over."""
        self.stopper = EarlyStopping(
            self.patience, self.score_function, trainer, threshold=self.min_delta, cumulative=self.cumulative_delta
        )
        self.stopper.load_state_dict({**self.stopper.state_dict(), **self.pending})
        # after ResumeHandler (attached with the trainer's handlers) has restored the state at STARTED
        trainer.add_event_handler(Events.STARTED, self.stay_stopped)

    def state_dict(self) -> dict[str, Any]:
        """``{"counter": int, "best_score": float | None, "stopped": bool}``."""
        state = self.stopper.state_dict() if self.stopper is not None else self.pending
        best = state["best_score"]
        return {
            "counter": int(state["counter"]),
            "best_score": None if best is None else float(best),
            "stopped": self.stopped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``.

        Raises:
            ValueError: a key is missing.
        """
        missing = {"counter", "best_score", "stopped"} - set(state)
        if missing:
            raise ValueError(f"early-stop state lacks {sorted(missing)}; got keys {sorted(state)}")
        self.stopped = bool(state["stopped"])
        self.pending = {"counter": int(state["counter"]), "best_score": state["best_score"]}
        if self.stopper is not None:
            self.stopper.load_state_dict({**self.stopper.state_dict(), **self.pending})

    def __call__(self, engine: Engine) -> None:
        if self.stopper is None:
            raise RuntimeError(
                "ResumableEarlyStopHandler has no trainer: call set_trainer(trainer) first "
                '(configs/train.json: "$@stage2#early_stop.set_trainer(@stage2#trainer)" in run)'
            )
        self.stopper(engine)
        if self.stopper.counter >= self.patience:
            self.stopped = True

    def stay_stopped(self, trainer: Engine) -> None:
        """At the trainer's ``STARTED``: end a stage that an earlier run had already stopped early."""
        if self.stopped:
            logger.info(
                "early stopping had already ended this stage at epoch %d; not training further", trainer.state.epoch
            )
            trainer.terminate()
