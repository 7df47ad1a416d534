"""Stage-2 modules: instance-adaptive semantic reference, alignment and the fusion head."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmml_monai.networks.utils import AttentionLayer, TransformerLayer
from cmml_monai.utils import as_bool

__all__ = ["InstanceAdaptiveReference", "CrossModalAlignment", "FusionHead", "ProjectionHead"]


class InstanceAdaptiveReference(nn.Module):
    """``R_i = C + CrossAttn(C, [C^N_i; tokens_i])``: context tokens infused with the completed case (§9).

    Args:
        feature_dim: ``d``.
        num_heads: attention heads.
        dropout: attention dropout.
        reads_context: the keys include the CRTA-refined context tokens when given; False reads the completed
            modality tokens only, so every key carries the case.

    Example::

        >>> ref = InstanceAdaptiveReference(32)
        >>> ref(torch.randn(2, 8, 32), torch.randn(2, 3, 32), torch.randn(2, 8, 32)).shape
        torch.Size([2, 8, 32])
    """

    def __init__(
        self, feature_dim: int = 256, num_heads: int = 4, dropout: float = 0.0, reads_context: bool = True
    ) -> None:
        super().__init__()
        self.reads_context = as_bool(reads_context, "reads_context")
        self.attn = AttentionLayer(feature_dim, num_heads, dropout)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``query [B, K, d]`` (the context prior) reads ``tokens [B, k, d]`` and the refined ``context``."""
        keys = tokens
        if self.reads_context and context is not None:
            keys = torch.cat([context, tokens], dim=1)
        return self.attn(query, keys)


class CrossModalAlignment(nn.Module):
    """``u_m = f~_m + CrossAttn(f~_m, R_i)``: each (completed) modality token reads the reference.

    Args:
        feature_dim: ``d``.
        num_heads: attention heads.
        dropout: attention dropout.

    Example::

        >>> CrossModalAlignment(32)(torch.randn(2, 3, 32), torch.randn(2, 8, 32)).shape
        torch.Size([2, 3, 32])
    """

    def __init__(self, feature_dim: int = 256, num_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = AttentionLayer(feature_dim, num_heads, dropout)

    def forward(self, tokens: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return self.attn(tokens, reference)


class ProjectionHead(nn.Module):
    """Two-layer MLP projection (``d -> d -> p``) used by the alignment and contrastive losses.

    Example::

        >>> ProjectionHead(32, 16)(torch.randn(2, 3, 32)).shape
        torch.Size([2, 3, 16])
    """

    def __init__(self, feature_dim: int, projection_dim: int) -> None:
        super().__init__()
        if projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1, got {projection_dim}.")
        self.net = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.GELU(), nn.Linear(feature_dim, projection_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FusionHead(nn.Module):
    """Transformer over ``[R_i; u]``, mean-pooled, then a linear classifier.

    Args:
        feature_dim: ``d``.
        num_classes: output logits.
        num_layers: transformer layers.
        num_heads: attention heads.
        dropout: dropout in the transformer and before the classifier.

    Example::

        >>> logits, pooled = FusionHead(32, 5)(torch.randn(2, 11, 32))
        >>> logits.shape, pooled.shape
        (torch.Size([2, 5]), torch.Size([2, 32]))
    """

    def __init__(
        self, feature_dim: int, num_classes: int, num_layers: int = 1, num_heads: int = 4, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.layers = nn.ModuleList([TransformerLayer(feature_dim, num_heads, 2.0, dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(feature_dim)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, tokens: torch.Tensor, num_pooled: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits [B, num_classes], pooled [B, d])``.

        ``num_pooled > 0`` pools only the last ``num_pooled`` tokens (the modality tokens): the
        reference tokens take part in the attention but do not dilute the pooled case evidence.
        """
        for layer in self.layers:
            tokens = layer(tokens)
        if num_pooled > 0:
            tokens = tokens[:, tokens.shape[1] - num_pooled :]
        pooled = self.norm(tokens.mean(dim=1))
        return self.classifier(self.drop(pooled)), pooled


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (kept here so every projection uses the same eps)."""
    return F.normalize(x, dim=-1, eps=1e-6)
