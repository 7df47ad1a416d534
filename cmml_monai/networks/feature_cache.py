"""A content-keyed cache of a frozen backbone's features: each distinct image is encoded once."""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

import numpy as np
import torch
import torch.nn as nn

__all__ = ["FeatureCache", "weights_tag"]


def weights_tag(module: nn.Module) -> str:
    """A short hash of ``module``'s state dict (names, shapes, values): the cache key of a set of weights.

    Example:
        >>> len(weights_tag(nn.Linear(2, 2)))
        16
    """
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """Serve a frozen backbone's features by the content of each input row.

    A row's key hashes the backbone's weights and the row's bytes, so an image seen again (a later epoch,
    another missing-rate view, another run with ``cache_dir``) is not encoded again, and a changed image or
    changed weights never reuse a stale feature. Only valid for a backbone in eval mode that is not trained
    (:class:`cmml_monai.networks.ImageEncoder` with ``freeze_backbone``); a backbone in training mode is
    always run. Features are kept as float32 on the CPU and, with ``cache_dir``, in
    ``cache_dir/<weights tag>/<key>.npy`` (written atomically). Copies of the cache (the weight-averaged
    model is a deep copy of the network) share it.

    Args:
        backbone: the frozen backbone (its weights name the cache).
        cache_dir: folder of the on-disk cache, or ``None`` for memory only.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
        >>> cache = FeatureCache(net)
        >>> x = torch.randn(3, 3, 2, 2)
        >>> torch.allclose(cache(net, x), net(x)), cache(net, x).shape, cache.misses
        (True, torch.Size([3, 4]), 3)
    """

    def __init__(self, backbone: nn.Module, cache_dir: str | os.PathLike | None = None) -> None:
        self.tag = weights_tag(backbone)
        self.dir = None if cache_dir is None else os.path.join(os.fspath(cache_dir), self.tag)
        if self.dir is not None:
            os.makedirs(self.dir, exist_ok=True)
        self.memory: dict[str, torch.Tensor] = {}
        self.misses = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> FeatureCache:
        return self

    def _key(self, row: torch.Tensor) -> str:
        digest = hashlib.blake2b(self.tag.encode(), digest_size=16)
        digest.update(str((tuple(row.shape), str(row.dtype))).encode())
        digest.update(row.contiguous().numpy().data)  # the array's buffer: no copy of the image
        return digest.hexdigest()

    def _lookup(self, key: str) -> torch.Tensor | None:
        feat = self.memory.get(key)
        if feat is None and self.dir is not None:
            path = os.path.join(self.dir, key + ".npy")
            if os.path.isfile(path):
                feat = torch.from_numpy(np.load(path))
                self.memory[key] = feat
        return feat

    def _store(self, key: str, feat: torch.Tensor) -> None:
        self.memory[key] = feat
        if self.dir is not None:
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, feat.numpy())
            os.replace(tmp, os.path.join(self.dir, key + ".npy"))

    def __call__(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if backbone.training:  # BatchNorm in training mode depends on the batch: nothing to cache
            return backbone(x)
        rows = x.detach().to("cpu", torch.float32)
        keys = [self._key(r) for r in rows]
        feats = [self._lookup(k) for k in keys]
        todo = [i for i, f in enumerate(feats) if f is None]
        if todo:
            with torch.no_grad():
                new = backbone(x[todo]).detach().to("cpu", torch.float32)
            for i, feat in zip(todo, new):
                feats[i] = feat = feat.clone()
                self._store(keys[i], feat)
            self.misses += len(todo)
        return torch.stack(feats).to(x.device)  # type: ignore[arg-type]
