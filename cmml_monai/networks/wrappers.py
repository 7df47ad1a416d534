"""Adapters around the networks for code that can only call ``forward`` (e.g. DistributedDataParallel)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["TrainingForward"]


class TrainingForward(nn.Module):
    """Expose ``net.forward_train`` as ``forward`` so ``DistributedDataParallel`` can wrap it.

    DDP only synchronises gradients for calls that go through its own ``forward``; calling
    ``ddp.module.forward_train`` would bypass it. Wrap first, then DDP:
    ``DDP(TrainingForward(net), find_unused_parameters=...)``. The wrapper owns no parameters of
    its own, so checkpoints of ``net`` are unchanged. Parameters outside the current stage get no
    gradient: either set ``requires_grad=False`` on them before building DDP or pass
    ``find_unused_parameters=True``.

    Args:
        net: a network with ``forward_train(image, tabular=None, stage=...)``.

    Example::

        >>> from functools import partial
        >>> from cmml_monai.networks import InputSpec, LateFusionNet, MultiModalEncoder
        >>> resnet10 = partial(MultiModalEncoder, image_encoder="resnet10")
        >>> net = LateFusionNet(InputSpec(1, 3, 2, 2), feature_dim=32, encoder=resnet10)
        >>> sorted(TrainingForward(net)(torch.randn(2, 3, 16, 16), None, 1))
        ['logits', 'present']
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        if not hasattr(net, "forward_train"):
            raise ValueError(f"net {type(net).__name__} has no forward_train(image, tabular, stage).")
        self.net = net

    def forward(
        self, image: torch.Tensor, tabular: torch.Tensor | None = None, stage: int = 2
    ) -> dict[str, torch.Tensor]:
        return self.net.forward_train(image, tabular, stage=stage)
