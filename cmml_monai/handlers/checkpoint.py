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
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader

from cmml_monai.utils import as_bool

__all__ = ["latest_checkpoint", "StageCheckpointSaver", "BestCheckpointSaver", "ResumeHandler", "LoadNetworkHandler"]

logger = logging.getLogger(__name__)

_EPOCH_RE = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(folder: str) -> str | None:
    """The ``checkpoint_epoch=N.pt`` with the largest N in ``folder`` (written by
    :class:`StageCheckpointSaver`), or None."""
    best, best_epoch = None, -1
    for path in glob.glob(os.path.join(glob.escape(folder), "checkpoint_epoch=*.pt")):
        m = _EPOCH_RE.search(os.path.basename(path))
        if m and int(m.group(1)) > best_epoch:
            best, best_epoch = path, int(m.group(1))
    return best


def _is_count(value: object, minimum: int) -> bool:
    """An int (not a bool, not a float) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _atomic_disk(save_dir: str) -> DiskSaver:
    """Ignite's ``DiskSaver`` writing each file to a temporary name and renaming it into place (only on
    rank 0), so a run killed mid-write never leaves a truncated checkpoint for the next resume."""
    return DiskSaver(save_dir, atomic=True, create_dir=True, require_empty=False)


class StageCheckpointSaver:
    """A stage's full state (network, optimizer, scheduler, trainer, ...) saved by Ignite's ``Checkpoint``:
    every epoch (``checkpoint_epoch=N.pt``, the last ``n_saved`` kept) and at the end or at an error
    (``checkpoint_final.pt``); the attached trainer joins ``save_dict`` as ``"trainer"``.

    Not MONAI's ``CheckpointSaver`` (nor Ignite's ``Checkpoint`` under it): they keep the epoch files an
    earlier (killed) run left, write the final state as a second full copy, and save nothing at an error.

    A config cannot reference the trainer inside the trainer's own handler list (a reference cycle),
    so the trainer is added when the handler is attached.

    Args:
        save_dir: the stage's checkpoint folder.
        save_dict: objects to save (network, optimizer, lr_scheduler); the same dict as ``ResumeHandler``'s.
        save_final: write ``final_filename`` when the run completes or raises.
        final_filename: name of the final checkpoint.
        n_saved: epoch checkpoints kept.

    Example::

        >>> import tempfile
        >>> from ignite.engine import Engine
        >>> folder = tempfile.mkdtemp()
        >>> engine = Engine(lambda e, b: None)
        >>> StageCheckpointSaver(folder, {"network": torch.nn.Linear(1, 1)}).attach(engine)
        >>> _ = engine.run([0], max_epochs=2)
        >>> sorted(os.listdir(folder))
        ['checkpoint_epoch=2.pt', 'checkpoint_final.pt']
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        save_final: bool = True,
        final_filename: str = "checkpoint_final.pt",
        n_saved: int = 1,
    ) -> None:
        if not _is_count(n_saved, 1):
            raise ValueError(f"n_saved must be an integer >= 1, got {n_saved!r}.")
        self.save_dir = save_dir
        self.save_dict = save_dict
        self.save_final = as_bool(save_final, "save_final")
        self.final_filename = final_filename
        self.n_saved = n_saved
        self.epoch_checkpoint: Checkpoint | None = None
        self.final_checkpoint: Checkpoint | None = None
        self.kept: list[str] = []  # the epoch files this saver wrote and Ignite keeps (its last n_saved)

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        disk = _atomic_disk(self.save_dir)
        # "checkpoint_epoch=N.pt": several objects are saved under the name "checkpoint", scored by the epoch
        self.epoch_checkpoint = Checkpoint(
            self.save_dict, disk, score_function=lambda e: e.state.epoch, score_name="epoch", n_saved=self.n_saved
        )
        self.final_checkpoint = Checkpoint(self.save_dict, disk, filename_pattern=self.final_filename, n_saved=1)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        if self.save_final:
            engine.add_event_handler(Events.COMPLETED, self.completed)
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def epoch_completed(self, engine: Engine) -> None:
        """Save this epoch's checkpoint, then delete the epoch checkpoints this saver does not keep.

        Ignite's ``Checkpoint`` only deletes (beyond ``n_saved``) the files it wrote itself: a resumed run
        would keep the killed run's last ``checkpoint_epoch=N.pt`` (a full checkpoint of disk) next to its
        own, and a run with ``resume`` off would resume from the older run's later epoch after a crash. The
        other files go only after the new one is complete, so a kill at any moment leaves one to resume from.
        """
        self.epoch_checkpoint(engine)
        if idist.get_rank() > 0:
            return
        last = self.epoch_checkpoint.last_checkpoint
        if last is not None and os.path.basename(str(last)) not in self.kept:
            self.kept = [*self.kept, os.path.basename(str(last))][-self.n_saved :]
        kept = set(self.kept)
        for path in glob.glob(os.path.join(glob.escape(self.save_dir), "checkpoint_epoch=*.pt")):
            if _EPOCH_RE.search(os.path.basename(path)) and os.path.basename(path) not in kept:
                os.remove(path)
                logger.info("removed %s: an epoch checkpoint of an earlier run", path)

    def completed(self, engine: Engine) -> None:
        """Write ``checkpoint_final.pt``: a hard link to the epoch checkpoint this run just saved when that
        holds the final state (a copy where the filesystem has no hard links), else a fresh save.

        The final state is the last epoch's: writing it again doubled a stage's disk use (660 MB per
        full checkpoint on the MEN layout). The link survives the epoch file's later deletion.
        Under several processes only rank 0 touches the files.
        """
        if idist.get_rank() > 0:
            return
        last = self.epoch_checkpoint.last_checkpoint if self.epoch_checkpoint is not None else None
        match = _EPOCH_RE.search(os.path.basename(str(last))) if last else None
        if not (match and int(match.group(1)) == engine.state.epoch and os.path.isfile(last)):
            self._save_final(engine)  # e.g. a resumed stage that had nothing left to train
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
        """Save the state at the failure as ``checkpoint_final.pt``, then raise the error again (Ignite
        re-raises only when no handler listens to ``EXCEPTION_RAISED``)."""
        self._save_final(engine)
        raise e

    def _save_final(self, engine: Engine) -> None:
        # a fresh final save each time (Ignite fires EXCEPTION_RAISED twice for an error inside an epoch);
        # the atomic rename replaces the file name only, so an epoch file the old final was linked to is kept
        self.final_checkpoint.reset()
        self.final_checkpoint(engine)
        logger.info("final checkpoint %s saved at epoch %d", self._final_path(), engine.state.epoch)

    def _final_path(self) -> str:
        return os.path.join(self.save_dir, self.final_filename)


class BestCheckpointSaver:
    """``model_best.pt`` by the evaluator's key metric, whose best-so-far survives a resume.

    Put this object in the stage's ``checkpoint_dict`` too (``"best": "@...#best_saver"``): its
    ``state_dict`` (the saved file and its score) then travels with every epoch checkpoint and
    ``ResumeHandler`` restores it, so a resumed run only replaces ``model_best.pt`` with a better score.

    Not MONAI's ``CheckpointSaver(save_key_metric=True)``: it has no first eligible epoch and no
    ``state_dict``, so it keeps a warm-up epoch's lucky score and forgets the best score at a resume. The
    file itself is written by Ignite's ``Checkpoint`` and ``DiskSaver`` (atomic, rank 0, the single object's
    state dict saved unwrapped).

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
        key_metric_name: metric of ``engine.state.metrics`` to compare; None: the evaluator's key metric.

    Example::

        >>> import tempfile
        >>> saver = BestCheckpointSaver(tempfile.mkdtemp(), {"network": torch.nn.Linear(1, 1)}, min_epoch=2)
        >>> saver.state_dict()
        {'best_score': None, 'filename': 'model_best.pt'}
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
        key_metric_name: str | None = None,
    ) -> None:
        if not _is_count(min_epoch, 1):
            raise ValueError(f"best_min_epoch must be an integer >= 1, got {min_epoch!r}.")
        if max_epochs is not None and not _is_count(max_epochs, 0):
            raise ValueError(f"max_epochs must be an integer >= 0 or None, got {max_epochs!r}.")
        self.save_dir = save_dir
        self.save_dict = save_dict
        self.filename = filename
        self.key_metric_name = key_metric_name
        self.min_epoch = min_epoch
        self.first_eligible_epoch = min(min_epoch, max_epochs) if max_epochs else min_epoch
        self.best_score: float | None = None
        self._checkpoint = Checkpoint(
            save_dict, _atomic_disk(save_dir), filename_pattern=filename, score_function=self._score, n_saved=1
        )

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.metrics_completed)

    def _score(self, engine: Engine) -> float:
        name = self.key_metric_name or engine.state.key_metric_name
        if name not in engine.state.metrics:
            raise ValueError(
                f"{self.filename}: the metric {name!r} is not among the evaluator's metrics "
                f"{sorted(engine.state.metrics)}; set key_metric_name to one of them"
            )
        return float(engine.state.metrics[name])

    def metrics_completed(self, engine: Engine) -> None:
        """Save ``filename`` when this epoch's key metric beats the best so far, from ``first_eligible_epoch`` on."""
        if engine.state.epoch < self.first_eligible_epoch:
            logger.info(
                "epoch %d is before best_min_epoch %d: not a candidate for the best checkpoint",
                engine.state.epoch,
                self.first_eligible_epoch,
            )
            return
        score = self._score(engine)
        if self.best_score is not None and not score > self.best_score:
            return
        # forget the previous best so Checkpoint writes the same file name again (atomically, in place)
        self._checkpoint.reset()
        self._checkpoint(engine)
        self.best_score = score
        logger.info("%s saved: epoch %d, score %.4f", self.filename, engine.state.epoch, score)

    def state_dict(self) -> dict:
        """The best score so far and the file it was saved to (``best_score`` None before the first save)."""
        return {"best_score": self.best_score, "filename": self.filename}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``.

        Raises:
            ValueError: ``best_score`` is missing.
        """
        if "best_score" not in state:
            raise ValueError(f"best-checkpoint state lacks 'best_score'; got keys {sorted(state)}")
        self.best_score = None if state["best_score"] is None else float(state["best_score"])


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

    MONAI's ``CheckpointLoader`` loads the file; this handler finds the latest ``checkpoint_epoch=N.pt``
    when the stage starts (a ``CheckpointLoader`` needs the path when the config is built).

    Attach it first among the trainer handlers. With ``enabled=False`` (or no checkpoint) it does nothing.

    Args:
        checkpoint_dir: where the stage's ``checkpoint_epoch=N.pt`` files are saved.
        load_dict: the objects to restore, the same dict the :class:`StageCheckpointSaver` saved.
        enabled: resume at all.

    Example::

        >>> state = {"network": torch.nn.Linear(1, 1)}
        >>> ResumeHandler("out/stage1", state).attach(trainer)  # doctest: +SKIP
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
        CheckpointLoader(load_path=path, load_dict=self.load_dict, map_location=engine.state.device)(engine)
        self.loaded_from = path
        logger.info("resumed from %s at epoch %d of %s", path, engine.state.epoch, engine.state.max_epochs)


class LoadNetworkHandler:
    """At ``STARTED`` of a fresh stage (epoch 0), load network weights from an earlier stage's checkpoint.

    Not MONAI's ``CheckpointLoader``: that loads a path fixed when the config is built, also into a resumed
    stage; this finds the earlier stage's latest epoch file when the stage starts and skips a resumed one.

    Stage 2 starts from stage 1: from the stage-1 network state, whether stage 1 ran in this process or
    an earlier one. A missing file is fine when ``required`` is False (e.g. baselines without stage 1).

    Args:
        checkpoint_dir: the earlier stage's checkpoint folder (its latest ``checkpoint_epoch=N.pt``).
        network: the network to load into.
        key: key of the network in the checkpoint dict.
        required: raise ``FileNotFoundError`` when there is no checkpoint.

    Example::

        >>> LoadNetworkHandler("out/stage1", network).attach(stage2_trainer)  # doctest: +SKIP
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
