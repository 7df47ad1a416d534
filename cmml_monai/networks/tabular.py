"""Feature tokenizer + small transformer for the clinical table (one d-dim token per case)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from cmml_monai.networks.utils import TransformerLayer, masked_mean

__all__ = ["TabularEncoder"]


class TabularEncoder(nn.Module):
    """Encode an encoded table row into one token.

    Each cell becomes a token: numeric features ``value * w_j + b_j``, categorical features an
    embedding of their code, a missing cell (``cell_mask`` False) a learned per-feature token. A
    small transformer mixes the cell tokens, and the output is the mean over the present cells.

    Args:
        cardinalities: per feature, 0 = numeric, ``n > 0`` = categorical with codes ``0..n-1``
            (``TableSchema.cardinalities``). Out-of-range codes are clamped.
        feature_dim: token width ``d``.
        num_layers: transformer layers over the cell tokens (1 or 2 is plenty).
        num_heads: attention heads.
        dropout: dropout in the transformer.

    Example::

        >>> enc = TabularEncoder([0, 3, 0], feature_dim=32)
        >>> x = torch.tensor([[0.5, 2.0, -1.0]])
        >>> enc(x, torch.ones_like(x, dtype=torch.bool)).shape
        torch.Size([1, 32])
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        feature_dim: int = 256,
        num_layers: int = 1,
        num_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        cards = [int(c) for c in cardinalities]
        if len(cards) == 0 or any(c < 0 for c in cards):
            raise ValueError(f"cardinalities must be a non-empty list of ints >= 0, got {list(cardinalities)}.")
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}.")
        self.num_features = len(cards)
        self.cardinalities = cards
        n = self.num_features
        self.num_weight = nn.Parameter(torch.randn(n, feature_dim) * 0.02)
        self.num_bias = nn.Parameter(torch.randn(n, feature_dim) * 0.02)
        self.missing_token = nn.Parameter(torch.randn(n, feature_dim) * 0.02)
        # one embedding table for all categorical features; row 0 is a dummy for numeric ones
        offsets, start = [], 1
        for c in cards:
            offsets.append(start if c > 0 else 0)
            start += c
        self.embedding = nn.Embedding(start, feature_dim) if start > 1 else None
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        max_code = torch.tensor([max(c - 1, 0) for c in cards], dtype=torch.long)
        self.register_buffer("max_code", max_code, persistent=False)
        self.register_buffer("is_cat", torch.tensor([c > 0 for c in cards], dtype=torch.bool), persistent=False)
        self.layers = nn.ModuleList([TransformerLayer(feature_dim, num_heads, 2.0, dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(feature_dim)

    def forward(self, tabular: torch.Tensor, cell_mask: torch.Tensor) -> torch.Tensor:
        """Args: ``tabular [B, F]`` without NaN, ``cell_mask [B, F]`` bool. Returns ``[B, d]``."""
        tok = tabular.unsqueeze(-1) * self.num_weight + self.num_bias  # [B, F, d]
        if self.embedding is not None:
            code = torch.minimum(torch.round(tabular).long().clamp_min(0), self.max_code)
            idx = self.offsets + code * self.is_cat.long()
            tok = torch.where(self.is_cat.unsqueeze(-1), self.embedding(idx), tok)
        tok = torch.where(cell_mask.unsqueeze(-1), tok, self.missing_token.to(tok.dtype))
        for layer in self.layers:
            tok = layer(tok)
        return self.norm(masked_mean(tok, cell_mask, dim=1))
