"""Stage-1 reconstruction loss of the synthesized modality tokens."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ReconstructionLoss"]


class ReconstructionLoss(nn.Module):
    """``MSE + (1 - cos)`` between synthesized and real (stop-gradient) tokens on ``recon_mask`` slots.

    The MSE is averaged over the feature dimension, then both terms over the masked slots. It is 0
    (with a graph, so ``backward`` still works) when no slot is masked.

    Example::

        >>> synth, target = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
        >>> round(ReconstructionLoss()(synth, synth, torch.ones(2, 3, dtype=torch.bool)).item(), 5)
        0.0
    """

    def forward(self, synth: torch.Tensor, target: torch.Tensor, recon_mask: torch.Tensor) -> torch.Tensor:
        """Args: ``synth, target [B, k, d]``, ``recon_mask [B, k]`` bool. Returns a scalar."""
        synth, target = synth.float(), target.detach().float()  # full precision under autocast
        mse = (synth - target).pow(2).mean(dim=-1)
        cos = F.cosine_similarity(synth, target, dim=-1, eps=1e-6)
        per_slot = mse + (1.0 - cos)
        w = recon_mask.to(per_slot.dtype)
        return (per_slot * w).sum() / w.sum().clamp_min(1.0)
