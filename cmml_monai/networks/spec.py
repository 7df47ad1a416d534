"""What the data fixes about a network (``InputSpec``) and the options of CMML's stages (``CMMLOptions``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from cmml_monai.utils import as_bool

__all__ = ["InputSpec", "CMMLOptions", "STAGE1_HEADS"]

#: stage-1 (auxiliary) head layouts (docs/method.md §8)
STAGE1_HEADS = ("mean", "norm_mean", "concat_mlp")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The inputs and outputs a dataset gives a network: shared by :class:`CMMLNet` and :class:`LateFusionNet`.

    ``configs/train.json`` builds it once as ``input_spec`` from ``@info`` (:class:`cmml_monai.data.DatasetInfo`).

    Args:
        image_modalities: number of image modalities ``M`` (packed along channels).
        image_channels: channels per image modality ``C``.
        spatial_dims: 2 or 3.
        num_classes: number of classes (single-label) or labels (multi-label).
        tabular_cardinalities: table feature cardinalities (0 = numeric), None for no table.
        multi_label: whether the outputs are independent labels; the network returns logits either way (the
            loss and the activation read it), it is kept so that the spec describes the outputs in full.

    Raises:
        ValueError: a count below 1, ``spatial_dims`` not 2 or 3, or a negative cardinality.

    Example::

        >>> InputSpec(2, 3, 2, 5, tabular_cardinalities=[0, 4]).tabular_cardinalities
        (0, 4)
    """

    image_modalities: int
    image_channels: int
    spatial_dims: int
    num_classes: int
    tabular_cardinalities: Sequence[int] | None = None
    multi_label: bool = False

    def __post_init__(self) -> None:
        for name in ("image_modalities", "image_channels", "num_classes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}.")
        cards = self.tabular_cardinalities
        if cards is not None:
            cards = tuple(int(c) for c in cards)
            if any(c < 0 for c in cards):
                raise ValueError(f"tabular_cardinalities must be >= 0 (0 = numeric), got {list(cards)}.")
        # frozen: the normalised values are set once here (a list from the config becomes a tuple)
        object.__setattr__(self, "tabular_cardinalities", cards)
        object.__setattr__(self, "multi_label", as_bool(self.multi_label, "multi_label"))


@dataclasses.dataclass(frozen=True)
class CMMLOptions:
    """The options of :class:`CMMLNet` that belong to no single component (docs/method.md §7-§16).

    Args:
        use_stage2: ablation switch: build stage 2 (reference, alignment, fusion); without it the served
            path is the stage-1 head.
        stage1_drop_prob: probability of dropping each present modality in stage 1.
        stage2_drop_prob: the same for the second stage-2 view.
        stage1_head: layout of the stage-1 head, one of ``STAGE1_HEADS``.
        residual_head: the stage-2 logits are the fusion head's plus the stage-1 head's.
        mark_synthesized: add a learned per-modality embedding to synthesized slots in stage 2.
        num_heads: attention heads of every transformer part (must divide ``feature_dim``).
        dropout: dropout in the transformer parts and heads.
        fusion_layers: transformer layers of the fusion head.
        projection_dim: width ``p`` of the alignment / contrastive projections.

    Raises:
        ValueError: a probability outside [0, 1], an unknown ``stage1_head`` or a switch that is not a bool.

    Example::

        >>> CMMLOptions(stage1_head="norm_mean", residual_head="false").residual_head
        False
    """

    use_stage2: bool = True
    stage1_drop_prob: float = 0.5
    stage2_drop_prob: float = 0.5
    stage1_head: str = "mean"
    residual_head: bool = True
    mark_synthesized: bool = False
    num_heads: int = 4
    dropout: float = 0.1
    fusion_layers: int = 1
    projection_dim: int = 128

    def __post_init__(self) -> None:
        # switches may arrive as command-line strings ("false")
        for name in ("use_stage2", "residual_head", "mark_synthesized"):
            object.__setattr__(self, name, as_bool(getattr(self, name), name))
        for name in ("stage1_drop_prob", "stage2_drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.stage1_head not in STAGE1_HEADS:
            raise ValueError(f"stage1_head must be one of {STAGE1_HEADS}, got {self.stage1_head!r}.")
