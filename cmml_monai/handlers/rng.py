"""The random number generators' state, saved with every stage checkpoint so a resumed run draws what an
uninterrupted run would have drawn."""

from __future__ import annotations

import random
from typing import Any, Iterable

import numpy as np
import torch

__all__ = ["RandomState"]


def _numpy_state(state: Any) -> dict[str, Any]:
    """``np.random.RandomState.get_state()`` as tensors and numbers (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = state
    return {
        "name": name,
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _numpy_tuple(state: dict[str, Any]) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["gauss"])


class RandomState:
    """``state_dict``/``load_state_dict`` of the global torch, CUDA, NumPy and Python generators, the
    training data loader's shuffling generator and the augmentation's own stream.

    Put it in a stage's ``checkpoint_dict`` (``"rng": "@rng_state"``): the checkpoint of epoch N then
    holds the generators as they were after epoch N, and ``ResumeHandler`` restores them before epoch
    N + 1 draws its shuffling order, modality drops and augmentation. Without it a resumed run reseeds
    (``set_determinism`` at start, the loader's generator at its seed) and repeats epoch 1's draws.

    Args:
        loaders: data loaders whose ``generator`` shuffles (``None`` entries are skipped).
        randomizables: MONAI ``Randomizable`` objects with their own ``R`` stream, e.g. the augmentation
            (``None`` entries, such as ``augmentation: none``, are skipped).

    Example::

        >>> state = RandomState().state_dict()
        >>> first = torch.rand(1)
        >>> RandomState().load_state_dict(state)
        >>> bool(torch.rand(1) == first)
        True
    """

    def __init__(self, loaders: Iterable[Any] = (), randomizables: Iterable[Any] = ()) -> None:
        generators = (getattr(loader, "generator", None) for loader in loaders if loader is not None)
        self.generators = [g for g in generators if g is not None]
        self.randomizables = [r for r in randomizables if r is not None and hasattr(r, "R")]

    def state_dict(self) -> dict[str, Any]:
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(np.random.get_state()),
            "python": random.getstate(),
            "loaders": [g.get_state() for g in self.generators],
            "randomizables": [_numpy_state(r.R.get_state()) for r in self.randomizables],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["loaders"]) != len(self.generators) or len(state["randomizables"]) != len(self.randomizables):
            raise ValueError(
                f"the checkpoint holds {len(state['loaders'])} loader and {len(state['randomizables'])} augmentation "
                f"generator states; this run has {len(self.generators)} and {len(self.randomizables)}"
            )
        torch.set_rng_state(state["torch"].cpu())
        np.random.set_state(_numpy_tuple(state["numpy"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        for generator, saved in zip(self.generators, state["loaders"]):
            generator.set_state(saved.cpu())
        for randomizable, saved in zip(self.randomizables, state["randomizables"]):
            randomizable.R.set_state(_numpy_tuple(saved))
        if "cuda" in state and torch.cuda.is_available():
            cuda = [s.cpu() for s in state["cuda"]]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
