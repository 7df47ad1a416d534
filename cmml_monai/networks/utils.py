"""Presence masks from NaN, masked pooling and small building blocks shared by the networks.

Everything here is written with tensor operations only (no Python branch on tensor values), so a
network traced with one missing pattern stays correct for every other pattern.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "constructor_args",
    "presence_from_nan",
    "masked_mean",
    "random_keep_mask",
    "GroupedLinear",
    "AttentionLayer",
    "TransformerLayer",
]


def constructor_args(values: Mapping[str, Any]) -> dict[str, Any]:
    """A network's constructor arguments from the ``locals()`` its ``__init__`` takes first thing.

    The networks keep them as ``build_args``: ``cmml_monai.deploy`` writes them beside the served
    weights, so a served model is rebuilt from that file alone, with every config override included.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self, width: int = 4) -> None:
        ...         args = constructor_args(locals())
        ...         super().__init__()
        ...         self.build_args = args
        >>> Net(8).build_args
        {'width': 8}
    """
    return {k: v for k, v in values.items() if k not in ("self", "__class__")}


def presence_from_nan(
    image: torch.Tensor,
    tabular: torch.Tensor | None,
    image_modalities: int,
    image_channels: int,
    num_features: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Derive the presence mask from NaNs and replace the NaNs by 0 (docs/method.md §2).

    Image modality ``i`` owns channels ``[i*C, (i+1)*C)``; it is present when any of its values is
    not NaN. The table is present when any cell is not NaN. ``tabular=None`` means no table: when
    ``num_features > 0`` (the network was built with a table) the table is reported missing and a
    zero table with an all-False cell mask is returned, otherwise ``k`` excludes the table.

    Args:
        image: ``[B, image_modalities * image_channels, *spatial]``.
        tabular: ``[B, F]`` encoded table, or None.
        image_modalities: number of image modalities ``M``.
        image_channels: channels per image modality ``C``.
        num_features: table width ``F`` the network was built with (0: no table).

    Returns:
        ``(present [B, k] bool, image_clean, tabular_clean or None, cell_mask [B, F] bool or None)``
        with ``k = M + 1`` when there is a table, else ``M``. Missing image modalities are all zeros
        in ``image_clean``, so their content can never reach an encoder.

    Example::

        >>> img = torch.randn(2, 6, 16, 16); img[0, 3:] = float("nan")
        >>> present, img0, tab0, cells = presence_from_nan(img, torch.randn(2, 3), 2, 3)
        >>> present.tolist()
        [[True, False, True], [True, True, True]]
    """
    if image_modalities < 1 or image_channels < 1:
        raise ValueError(f"image_modalities ({image_modalities}) and image_channels ({image_channels}) must be >= 1.")
    # shape checks only in eager mode: under tracing they would be baked in as constants
    checking = not torch.jit.is_tracing()
    if checking and (image.dim() < 3 or image.shape[1] != image_modalities * image_channels):
        raise ValueError(
            f"image must be [B, {image_modalities * image_channels}, *spatial] "
            f"({image_modalities} modalities x {image_channels} channels), got shape {list(image.shape)}."
        )
    b = image.shape[0]
    finite = ~torch.isnan(image)
    img_present = finite.reshape(b, image_modalities, -1).any(dim=-1)  # [B, M]
    # a missing modality is all NaN, so zeroing the NaN cells zeroes it whole: one pass over the image
    image_clean = image.masked_fill(~finite, 0.0)
    if tabular is None:
        if num_features <= 0:
            return img_present, image_clean, None, None
        tabular = torch.full((b, num_features), float("nan"), dtype=image.dtype, device=image.device)
    if checking and (tabular.dim() != 2 or (num_features > 0 and tabular.shape[1] != num_features)):
        raise ValueError(f"tabular must be [B, F={num_features}], got shape {list(tabular.shape)}.")
    cell_mask = ~torch.isnan(tabular)
    tabular_clean = torch.where(cell_mask, tabular, torch.zeros_like(tabular))
    present = torch.cat([img_present, cell_mask.any(dim=1, keepdim=True)], dim=1)
    return present, image_clean, tabular_clean, cell_mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` counting only positions where ``mask`` is True (0 when none).

    Args:
        x: ``[..., N, D]`` values (``dim`` indexes ``N``).
        mask: bool mask broadcastable to ``x`` without its last dimension, e.g. ``[B, N]``.
        dim: the dimension to pool.

    Example::

        >>> masked_mean(torch.ones(2, 3, 4), torch.tensor([[True, False, False], [False] * 3])).sum(-1)
        tensor([4., 0.])
    """
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim) / w.sum(dim).clamp_min(1.0)


def random_keep_mask(present: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Randomly drop present modalities, always keeping at least one per case that has one.

    Uses torch's RNG only, so ``monai.utils.set_determinism`` makes it reproducible.

    Args:
        present: ``[B, k]`` bool presence.
        drop_prob: probability of dropping each present modality, in ``[0, 1]``.

    Returns:
        ``[B, k]`` bool, a subset of ``present`` with at least one True where ``present`` has one.

    Example::

        >>> keep = random_keep_mask(torch.ones(4, 3, dtype=torch.bool), 1.0)
        >>> keep.sum(1).tolist()
        [1, 1, 1, 1]
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}.")
    score = torch.rand(present.shape, device=present.device)
    keep = present & (score >= drop_prob)
    # rows left empty keep their present modality with the highest score (vectorised, no branch)
    best = torch.where(present, score, torch.full_like(score, -1.0)).argmax(dim=1)
    fallback = F.one_hot(best, present.shape[1]).bool() & present
    empty = ~keep.any(dim=1, keepdim=True)
    return keep | (fallback & empty)


class GroupedLinear(nn.Module):
    """One independent linear layer per slot: ``y[:, m] = x[:, m] @ W_m + b_m``, vectorised.

    Args:
        groups: number of slots ``k``.
        in_features: input width.
        out_features: output width.

    Example::

        >>> GroupedLinear(3, 8, 4)(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 4])
    """

    def __init__(self, groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        if groups < 1 or in_features < 1 or out_features < 1:
            raise ValueError(
                f"groups, in_features, out_features must be >= 1, got {groups}, {in_features}, {out_features}."
            )
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bki,kio->bko", x, self.weight) + self.bias


class AttentionLayer(nn.Module):
    """Pre-norm (cross-)attention with a residual: ``q + Attn(LN(q), LN(kv))``.

    Written on ``F.scaled_dot_product_attention`` instead of ``nn.MultiheadAttention`` so eager,
    traced and scripted models run the same kernel (no nested-tensor fast path).

    Args:
        dim: token width.
        num_heads: attention heads (must divide ``dim``).
        dropout: attention dropout.

    Example::

        >>> AttentionLayer(32, 4)(torch.randn(2, 5, 32), torch.randn(2, 3, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, dim: int, num_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim}).")
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, nq, d = query.shape
        nk = context.shape[1]
        h = self.num_heads
        q = self.q(self.norm_q(query)).reshape(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(context)).reshape(b, nk, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return query + self.out(a.transpose(1, 2).reshape(b, nq, d))


class TransformerLayer(nn.Module):
    """Pre-norm transformer encoder layer (self-attention + MLP, both residual).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        dropout: dropout in attention and MLP.

    Example::

        >>> TransformerLayer(32, 4)(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, dim: int, num_heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = AttentionLayer(dim, num_heads, dropout)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x, x)
        return x + self.mlp(x)
