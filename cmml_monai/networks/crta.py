"""Cascaded residual transformer autoencoder (CRTA): synthesis of missing modality tokens (docs/method.md §5)."""

from __future__ import annotations

import torch
import torch.nn as nn

from cmml_monai.networks.utils import GroupedLinear, TransformerLayer
from cmml_monai.utils import as_bool

__all__ = ["CascadedResidualTransformerAE"]


class CascadedResidualTransformerAE(nn.Module):
    """Synthesize missing modality tokens from the present ones and the context tokens.

    Missing slots start as a learned per-modality token. Block ``b`` runs a transformer layer over
    ``[C^b; f^b_1..f^b_k]`` (plus a learned slot embedding so slots are distinguishable), a
    per-modality decoder gives ``Delta_m`` and only missing slots move:
    ``f^{b+1}_m = f^b_m + (1 - delta_m) Delta_m``. The context tokens are refined residually
    (the transformer layer is residual). Every block's modality tokens are kept (the cascade).

    Args:
        num_modalities: ``k``.
        feature_dim: ``d``.
        num_blocks: ``N`` (our default 3; the paper's abstract gives no value).
        num_heads: attention heads.
        mlp_ratio: MLP width of the transformer layers.
        dropout: dropout in the transformer layers.
        reads_context: attend to the context tokens; False runs over the modality tokens only, so a missing
            slot is completed from the case's observed tokens alone (``crta_reads_context`` in
            ``configs/train.json``, docs/method.md §4).

    Example::

        >>> crta = CascadedResidualTransformerAE(3, 32, num_blocks=2)
        >>> f, present = torch.randn(2, 3, 32), torch.tensor([[True, False, True], [True, True, False]])
        >>> tokens, context, blocks = crta(f, present, torch.randn(2, 8, 32))
        >>> tokens.shape, context.shape, blocks.shape
        (torch.Size([2, 3, 32]), torch.Size([2, 8, 32]), torch.Size([2, 2, 3, 32]))
    """

    def __init__(
        self,
        num_modalities: int,
        feature_dim: int = 256,
        num_blocks: int = 3,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        reads_context: bool = True,
    ) -> None:
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}.")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        self.num_modalities = num_modalities
        self.reads_context = as_bool(reads_context, "reads_context")
        self.missing_token = nn.Parameter(torch.randn(num_modalities, feature_dim) * 0.02)
        self.slot_embed = nn.Parameter(torch.randn(num_modalities, feature_dim) * 0.02)
        self.blocks = nn.ModuleList(
            [TransformerLayer(feature_dim, num_heads, mlp_ratio, dropout) for _ in range(num_blocks)]
        )
        self.decoders = nn.ModuleList([_Decoder(num_modalities, feature_dim) for _ in range(num_blocks)])

    def forward(
        self, tokens: torch.Tensor, present: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Complete the tokens.

        Args:
            tokens: ``[B, k, d]`` modality tokens (values of missing slots are ignored).
            present: ``[B, k]`` bool.
            context: ``[B, K, d]`` context tokens, or None (the no-context ablation); not read with
                ``reads_context=False``.

        Returns:
            ``(final tokens [B, k, d], refined context [B, K, d] or None, per-block tokens [N, B, k, d])``.
        """
        if not self.reads_context:
            context = None
        keep = present.unsqueeze(-1)
        f = torch.where(keep, tokens, self.missing_token.to(tokens.dtype).expand_as(tokens))
        missing = (~keep).to(tokens.dtype)
        k = self.num_modalities
        cascade = []
        for block, decoder in zip(self.blocks, self.decoders):
            x = f + self.slot_embed
            if context is not None:
                x = block(torch.cat([context, x], dim=1))
                context, h = x[:, :-k], x[:, -k:]
            else:
                h = block(x)
            f = f + missing * decoder(h)  # present slots stay exactly the encoder tokens
            cascade.append(f)
        return f, context, torch.stack(cascade, dim=0)


class _Decoder(nn.Module):
    """Per-modality two-layer MLP giving the residual update ``Delta_m``."""

    def __init__(self, num_modalities: int, feature_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.fc1 = GroupedLinear(num_modalities, feature_dim, feature_dim)
        self.act = nn.GELU()
        self.fc2 = GroupedLinear(num_modalities, feature_dim, feature_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(h))))
