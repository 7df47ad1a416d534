"""Learnable context tokens: a dataset-level prior shared by every case (docs/method.md §4)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ContextTokens"]


class ContextTokens(nn.Module):
    """``K x d`` learnable tokens, expanded to the batch.

    Args:
        num_tokens: ``K`` (our default 8; the paper's abstract gives no value).
        feature_dim: ``d``.

    Example::

        >>> ContextTokens(8, 32)(4).shape
        torch.Size([4, 8, 32])
    """

    def __init__(self, num_tokens: int = 8, feature_dim: int = 256) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}.")
        self.tokens = nn.Parameter(torch.randn(num_tokens, feature_dim) * 0.02)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.tokens.unsqueeze(0).expand(batch_size, -1, -1)
