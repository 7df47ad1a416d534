"""Stage-2 alignment loss: aligned modality projections towards the instance reference."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["AlignmentLoss"]


class AlignmentLoss(nn.Module):
    """Mean over masked modalities of ``1 - cos(aligned_m, reference)`` (0 when none is masked).

    Example::

        >>> ref = torch.randn(2, 8)
        >>> AlignmentLoss()(ref.unsqueeze(1).repeat(1, 3, 1), ref, torch.ones(2, 3, dtype=torch.bool)).item() < 1e-6
        True
    """

    def forward(self, aligned: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args: ``aligned [B, k, p]``, ``reference [B, p]``, ``mask [B, k]`` bool (None: all)."""
        aligned, reference = aligned.float(), reference.float()  # full precision under autocast
        dist = 1.0 - F.cosine_similarity(aligned, reference.unsqueeze(1).expand_as(aligned), dim=-1, eps=1e-6)
        if mask is None:
            return dist.mean()
        w = mask.to(dist.dtype)
        return (dist * w).sum() / w.sum().clamp_min(1.0)
