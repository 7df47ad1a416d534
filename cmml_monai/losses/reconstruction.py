"""Stage-1 reconstruction loss of the synthesized modality tokens."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ReconstructionLoss"]


class ReconstructionLoss(nn.Module):
    """``MSE + (1 - cos)`` between synthesized and real (stop-gradient) tokens on ``recon_mask`` slots.

    The MSE is averaged over the feature dimension, then both terms over the masked slots. It is 0
    (with a graph, so ``backward`` still works) when no slot is masked. ``synth`` may also be the
    whole cascade ``[N, B, k, d]`` (every CRTA block), then the loss is the mean over blocks.

    Example::

        >>> synth, target = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
        >>> round(ReconstructionLoss()(synth, synth, torch.ones(2, 3, dtype=torch.bool)).item(), 5)
        0.0
    """

    def forward(self, synth: torch.Tensor, target: torch.Tensor, recon_mask: torch.Tensor) -> torch.Tensor:
        """Args: ``synth [B, k, d]`` or ``[N, B, k, d]``, ``target [B, k, d]``, ``recon_mask [B, k]``."""
        synth, target = synth.float(), target.detach().float()  # full precision under autocast
        if synth.dim() == target.dim() + 1:  # cascade: broadcast target and mask over the blocks
            target = target.unsqueeze(0)
            recon_mask = recon_mask.unsqueeze(0).expand(synth.shape[0], -1, -1)
        mse = (synth - target).pow(2).mean(dim=-1)
        cos = F.cosine_similarity(synth, target, dim=-1, eps=1e-6)
        per_slot = mse + (1.0 - cos)
        w = recon_mask.to(per_slot.dtype)
        return (per_slot * w).sum() / w.sum().clamp_min(1.0)
