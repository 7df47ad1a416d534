"""Supervised contrastive loss (Khosla et al. 2020) with multi-label positives."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["SupConLoss"]


class SupConLoss(nn.Module):
    """SupCon on L2-normalised features; positives share the class (or >= 1 label when multi-label).

    For anchor ``i`` with positives ``P(i)`` (self excluded) and all others ``A(i)``:
    ``l_i = -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p / T) / sum_{a in A(i)} exp(z_i.z_a / T))``.
    Anchors with no positive are excluded; the loss is the mean over the remaining anchors, and 0
    (with a graph) when there is none.

    Args:
        temperature: ``T`` (0.07).

    Example::

        >>> z = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        >>> SupConLoss()(z, torch.tensor([0, 0, 1, 1])).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = temperature

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Args: ``features [N, p]`` (normalised), ``labels [N]`` class ids or ``[N, L]`` multi-hot."""
        if features.dim() != 2 or labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"features must be [N, p] and labels [N] or [N, L] with the same N, got {tuple(features.shape)} "
                f"and {tuple(labels.shape)}."
            )
        features = features.float()  # bf16 similarities / 0.07 would be too coarse under autocast
        n = features.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=features.device)
        if labels.dim() == 1:
            pos = labels.unsqueeze(0) == labels.unsqueeze(1)
        else:
            lab = (labels > 0.5).to(features.dtype)
            pos = (lab @ lab.t()) > 0
        pos = pos & ~eye
        sim = (features @ features.t()) / self.temperature
        sim = sim.masked_fill(eye, float("-inf"))
        log_prob = torch.log_softmax(sim, dim=1)
        # where() instead of multiplying: log_prob is -inf on the diagonal and 0 * -inf is NaN
        pos_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
        num_pos = pos.sum(dim=1)
        valid = num_pos > 0
        per_anchor = -pos_log_prob / num_pos.clamp_min(1).to(features.dtype)
        w = valid.to(features.dtype)
        return (per_anchor * w).sum() / w.sum().clamp_min(1.0)
