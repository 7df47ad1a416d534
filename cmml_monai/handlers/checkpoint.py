"""Resuming a stage from its last full checkpoint, and starting stage 2 from stage 1."""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from cmml_monai.utils import as_bool

__all__ = ["latest_checkpoint", "atomic_checkpoints", "StageCheckpointSaver",
           "BestCheckpointSaver", "ResumeHandler", "LoadNetworkHandler"]

logger = logging.getLogger(__name__)

_EPOCH_RE = re.compile(r"checkpoint_epoch=(\d+)\.pt$")
OPTIONAL_STATE = ("rng",)  # added to the stage checkpoints later: older checkpoints still resume


def latest_checkpoint(folder: str) -> str | None:
    """The ``checkpoint_epoch=N.pt`` with the largest N in ``folder`` (written by ``CheckpointSaver``
    with ``save_interval=1`` and ``epoch_level=True``), or None."""
    best, best_epoch = None, -1
    for path in glob.glob(os.path.join(glob.escape(folder), "checkpoint_epoch=*.pt")):
        m = _EPOCH_RE.search(os.path.basename(path))
        if m and int(m.group(1)) > best_epoch:
            best, best_epoch = path, int(m.group(1))
    return best


def atomic_checkpoints(saver: CheckpointSaver) -> CheckpointSaver:
    """Make ``saver`` write each checkpoint to a temporary file in its folder and rename it into place.

    MONAI's ``CheckpointSaver`` writes in place (ignite ``DiskSaver(atomic=False)``, for group-read
    permissions, which ignite's atomic mode now restores too): a run killed mid-write would leave a
    truncated ``checkpoint_epoch=N.pt`` that the next resume loads.
    """
    for name in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
        handler = getattr(getattr(saver, name, None), "save_handler", None)
        if handler is not None and hasattr(handler, "_atomic"):
            handler._atomic = True
    return saver


def _is_count(value: object, minimum: int) -> bool:
    """An int (not a bool, not a float) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


class StageCheckpointSaver(CheckpointSaver):
    """``CheckpointSaver`` of a stage's full state: every epoch (``checkpoint_epoch=N.pt``, the last one
    kept) and at the end (``checkpoint_final.pt``, linked to the last epoch's file rather than written
    twice); the attached trainer joins ``save_dict`` as ``"trainer"``.

    A config cannot reference the trainer inside the trainer's own handler list (a reference cycle),
    so the trainer is added when the handler is attached.

    Args:
        save_dir: the stage's checkpoint folder.
        save_dict: objects to save (network, optimizer, lr_scheduler); the same dict as ``ResumeHandler``'s.
        kwargs: other ``CheckpointSaver`` arguments.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs) -> None:
        kwargs.setdefault("save_final", True)
        kwargs.setdefault("final_filename", "checkpoint_final.pt")
        kwargs.setdefault("save_interval", 1)
        kwargs.setdefault("n_saved", 1)
        kwargs.setdefault("epoch_level", True)
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)
        atomic_checkpoints(self)

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        super().attach(engine)

    def interval_completed(self, engine: Engine) -> None:
        """Save this epoch's checkpoint, then delete the epoch checkpoints this saver does not keep.

        MONAI's saver only deletes (beyond ``n_saved``) the files it wrote itself: a resumed run would keep
        the killed run's last ``checkpoint_epoch=N.pt`` (a full checkpoint of disk) next to its own, and a
        run with ``resume`` off would resume from the older run's later epoch after a crash. The other
        files go only after the new one is complete, so a kill at any moment leaves one to resume from.
        """
        super().interval_completed(engine)
        if idist.get_rank() > 0 or not self.epoch_level or self._interval_checkpoint is None:
            return
        kept = {os.path.basename(str(item.filename)) for item in self._interval_checkpoint._saved}
        for path in glob.glob(os.path.join(glob.escape(self.save_dir), "checkpoint_epoch=*.pt")):
            if _EPOCH_RE.search(os.path.basename(path)) and os.path.basename(path) not in kept:
                os.remove(path)
                logger.info("removed %s: an epoch checkpoint of an earlier run", path)

    def completed(self, engine: Engine) -> None:
        """Write ``checkpoint_final.pt``: a hard link to the epoch checkpoint this run just saved when that
        holds the final state (a copy where the filesystem has no hard links), else a fresh save.

        The final state is the last epoch's: writing it again doubled a stage's disk use (660 MB per
        full checkpoint on the MEN layout). The link survives the epoch file's later deletion.
        Under several processes only rank 0 touches the files (ignite's ``DiskSaver`` saves on rank 0).
        """
        if idist.get_rank() > 0:
            return
        last = getattr(self._interval_checkpoint, "last_checkpoint", None)
        match = _EPOCH_RE.search(os.path.basename(str(last))) if last else None
        if not (self.epoch_level and match and int(match.group(1)) == engine.state.epoch and os.path.isfile(last)):
            self._unlink_final()  # e.g. a resumed stage that had nothing left to train: a fresh save
            super().completed(engine)
            return
        final = self._final_path()
        tmp = final + ".tmp"
        if os.path.lexists(tmp):
            os.remove(tmp)
        try:
            os.link(last, tmp)
        except OSError:
            shutil.copyfile(last, tmp)
        os.replace(tmp, final)  # never writes into an existing file, which may be linked to an epoch file
        logger.info("train completed: final checkpoint %s is the epoch-%d checkpoint", final, engine.state.epoch)

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        """Save the state at the failure as a new ``checkpoint_final.pt`` file (MONAI writes in place, which
        would also change an epoch checkpoint the old final file was linked to)."""
        if idist.get_rank() == 0:
            self._unlink_final()
        super().exception_raised(engine, e)

    def _final_path(self) -> str:
        return os.path.join(self.save_dir, self._final_filename or "checkpoint_final.pt")

    def _unlink_final(self) -> None:
        final = self._final_path()
        if os.path.lexists(final):
            os.remove(final)
        if self._final_checkpoint is not None:
            # MONAI deletes the final file it tracks before a new save: that file is gone now. Ignite fires
            # EXCEPTION_RAISED twice for an error inside an epoch, so without this the second call raised
            # FileNotFoundError over the run's own error.
            self._final_checkpoint._saved.clear()


class BestCheckpointSaver(CheckpointSaver):
    """``model_best.pt`` by the evaluator's key metric, whose best-so-far survives a resume.

    Put this object in the stage's ``checkpoint_dict`` too (``"best": "@...#best_saver"``): its
    ``state_dict`` (the saved file and its score) then travels with every epoch checkpoint and
    ``ResumeHandler`` restores it, so a resumed run only replaces ``model_best.pt`` with a better score.

    Validations before ``min_epoch`` (the stage's epoch, which the evaluator carries) are not
    candidates. The first epoch after a stage starts is a warm-up: its validation score on a small
    validation set can be the highest by chance while the model is still changing fast
    (docs/experiments.md §4). A stage shorter than ``min_epoch`` keeps its last epoch as a candidate, so
    every stage that validates writes a best file.

    Args:
        save_dir: the stage's checkpoint folder.
        save_dict: objects saved in ``model_best.pt`` (usually ``{"network": net}``).
        filename: name of the best file.
        min_epoch: first epoch of the stage whose validation can be saved as the best (1: every epoch).
        max_epochs: the stage's number of epochs; with fewer than ``min_epoch`` the last one is eligible.
        kwargs: other ``CheckpointSaver`` arguments.

    Example::

        >>> import tempfile
        >>> saver = BestCheckpointSaver(tempfile.mkdtemp(), {"network": torch.nn.Linear(1, 1)}, min_epoch=2)
        >>> saver.state_dict()
        OrderedDict([('_saved', [])])
        >>> saver.first_eligible_epoch
        2
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        filename: str = "model_best.pt",
        min_epoch: int = 1,
        max_epochs: int | None = None,
        **kwargs,
    ) -> None:
        if not _is_count(min_epoch, 1):
            raise ValueError(f"best_min_epoch must be an integer >= 1, got {min_epoch!r}.")
        if max_epochs is not None and not _is_count(max_epochs, 0):
            raise ValueError(f"max_epochs must be an integer >= 0 or None, got {max_epochs!r}.")
        kwargs.setdefault("key_metric_n_saved", 1)
        super().__init__(
            save_dir=save_dir, save_dict=save_dict, save_key_metric=True, key_metric_filename=filename, **kwargs
        )
        atomic_checkpoints(self)
        self.filename = filename
        self.min_epoch = min_epoch
        self.first_eligible_epoch = min(min_epoch, max_epochs) if max_epochs else min_epoch

    def metrics_completed(self, engine: Engine) -> None:
        """Compare and save as MONAI does, from ``first_eligible_epoch`` on."""
        if engine.state.epoch < self.first_eligible_epoch:
            logger.info(
                "epoch %d is before best_min_epoch %d: not a candidate for the best checkpoint",
                engine.state.epoch, self.first_eligible_epoch,
            )
            return
        before = self._best_score()
        super().metrics_completed(engine)
        after = self._best_score()
        if after is not None and after != before:
            # MONAI's own "best value ... at epoch" line also counts the epochs that were not candidates
            logger.info("%s saved: epoch %d, score %.4f", self.filename, engine.state.epoch, after)

    def _best_score(self) -> float | None:
        saved = self._key_metric_checkpoint._saved
        return float(saved[-1].priority) if saved else None

    def state_dict(self) -> dict:
        """The key-metric tracking list (score and file of the best checkpoint so far)."""
        return self._key_metric_checkpoint.state_dict()


def _fresh_data_iterator(engine: Engine) -> None:
    """Start each epoch on a new iterator of the engine's data loader, as a resumed run does.

    Ignite keeps the previous epoch's iterator and only replaces it when it is exhausted, at the next
    epoch's first batch; exhausting a ``RandomSampler`` iterator draws one more permutation from the
    loader's generator. A resumed run has no old iterator, so without this every epoch after a resume
    would be shuffled differently from the uninterrupted run's (the generator state in the checkpoint,
    ``RandomState``, would be one draw behind).
    """
    if engine.state.dataloader is not None:
        engine.set_data(engine.state.dataloader)


class ResumeHandler:
    """At ``STARTED``, load the last full state of this stage (network, optimizer, scheduler, trainer
    epoch, random generators) when one exists, so an interrupted run continues where it stopped; every
    epoch draws its data order from a new loader iterator, whether resumed or not.

    Attach it first among the trainer handlers. With ``enabled=False`` (or no checkpoint) it does nothing.

    Args:
        checkpoint_dir: where the stage's ``checkpoint_epoch=N.pt`` files are saved.
        load_dict: the objects to restore, the same dict the ``CheckpointSaver`` saved.
        enabled: resume at all.
    """

    def __init__(self, checkpoint_dir: str, load_dict: dict, enabled: bool = True) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.load_dict = load_dict
        self.enabled = as_bool(enabled, "resume")
        self.loaded_from: str | None = None

    def attach(self, engine: Engine) -> None:
        self.load_dict.setdefault("trainer", engine)
        engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(Events.EPOCH_STARTED, _fresh_data_iterator)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            return
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return
        load_dict = self.load_dict
        saved = set(torch.load(path, map_location="cpu", weights_only=True, mmap=True))  # keys only: no copy
        older = [k for k in OPTIONAL_STATE if k in load_dict and k not in saved]
        if older:  # a checkpoint of an earlier version of this package: resume without that state
            logger.warning("%s has no %s state (an earlier version wrote it): resumed without it, so the run "
                           "will not match an uninterrupted one exactly", path, ", ".join(older))
            load_dict = {k: v for k, v in load_dict.items() if k not in older}
        CheckpointLoader(load_path=path, load_dict=load_dict, map_location=engine.state.device)(engine)
        self.loaded_from = path
        logger.info("resumed from %s at epoch %d of %s", path, engine.state.epoch, engine.state.max_epochs)


class LoadNetworkHandler:
    """At ``STARTED`` of a fresh stage (epoch 0), load network weights from an earlier stage's checkpoint.

    Stage 2 starts from stage 1: from the stage-1 network state, whether stage 1 ran in this process or
    an earlier one. A missing file is fine when ``required`` is False (e.g. baselines without stage 1).

    Args:
        checkpoint_dir: the earlier stage's checkpoint folder (its latest ``checkpoint_epoch=N.pt``).
        network: the network to load into.
        key: key of the network in the checkpoint dict.
        required: raise ``FileNotFoundError`` when there is no checkpoint.
    """

    def __init__(self, checkpoint_dir: str, network: torch.nn.Module, key: str = "network", required: bool = False):
        self.checkpoint_dir = checkpoint_dir
        self.network = network
        self.key = key
        self.required = required
        self.loaded_from: str | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch > 0:  # resumed mid-stage: the stage's own checkpoint already has the weights
            return
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            if self.required:
                raise FileNotFoundError(
                    f"no checkpoint_epoch=N.pt in {self.checkpoint_dir}: run the earlier stage first"
                )
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.network.load_state_dict(state[self.key] if self.key in state else state)
        self.loaded_from = path
        logger.info("network initialised from %s", path)
