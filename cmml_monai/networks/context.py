"""Learnable context tokens: a dataset-level prior, optionally shifted per case (docs/method.md §4)."""

from __future__ import annotations

import torch
import torch.nn as nn

from cmml_monai.utils import as_bool

__all__ = ["ContextTokens"]


class ContextTokens(nn.Module):
    """``K x d`` learnable tokens, expanded to the batch.

    With ``conditioned=True`` each case gets its own tokens, ``C_i = C + reshape(W p_i)``, where ``p_i`` is
    the mean of the case's observed modality tokens and ``W`` a linear map to ``K x d`` that starts at
    zero (training starts from the shared prior). Shared tokens carry no information about the case, so
    the CRTA's attention over them and the reference they query are the same for every case; the shift
    lets both start from what was observed.

    Args:
        num_tokens: ``K`` (our default 8; the paper's abstract gives no value).
        feature_dim: ``d``.
        conditioned: add the per-case shift (needs ``case`` in ``forward``); ``instance_context`` in
            ``configs/train.json`` (docs/method.md §4).

    Example::

        >>> ContextTokens(8, 32)(4).shape
        torch.Size([4, 8, 32])
        >>> ContextTokens(8, 32, conditioned=True)(4, torch.randn(4, 32)).shape
        torch.Size([4, 8, 32])
    """

    __constants__ = ["conditioned"]

    def __init__(self, num_tokens: int = 8, feature_dim: int = 256, conditioned: bool = False) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}.")
        self.tokens = nn.Parameter(torch.randn(num_tokens, feature_dim) * 0.02)
        self.conditioned = as_bool(conditioned, "conditioned")
        if self.conditioned:
            self.condition = nn.Linear(feature_dim, num_tokens * feature_dim)
            nn.init.zeros_(self.condition.weight)
            nn.init.zeros_(self.condition.bias)

    def forward(self, batch_size: int, case: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, K, d]`` tokens; ``case`` ``[B, d]`` (the pooled observed tokens) is read when conditioned."""
        tokens = self.tokens.unsqueeze(0).expand(batch_size, -1, -1)
        if self.conditioned:
            if case is None:
                raise ValueError("conditioned context tokens need the pooled case tokens")
            tokens = tokens + self.condition(case).view(tokens.shape)
        return tokens
