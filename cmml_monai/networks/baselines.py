"""Late-fusion baselines with the same encoders as CMML: zero fill, modality dropout, mean imputation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from cmml_monai.networks.encoders import MultiModalEncoder
from cmml_monai.networks.spec import InputSpec
from cmml_monai.networks.utils import constructor_args, masked_mean, random_keep_mask
from cmml_monai.utils import as_bool

__all__ = ["LateFusionNet", "LATE_FUSION_MODES"]

LATE_FUSION_MODES = ("zero_fill", "modality_dropout", "mean_impute")


class LateFusionNet(nn.Module):
    """Concatenate the modality tokens and classify with an MLP; missing tokens are filled.

    - ``zero_fill``: missing tokens are zeros and the presence indicators are concatenated.
    - ``modality_dropout``: ``zero_fill`` plus, in ``forward_train`` while training, dropping each
      present modality with ``dropout_prob`` (at least one kept), by masking tokens. With
      ``two_view``, training classifies the observed case too (``logits``) and the dropped one as
      ``logits_dropped``, the two views of CMML's stage 2, so the loss's second-view classification
      and distillation terms apply to this baseline as they do to CMML.
    - ``mean_impute``: a missing token is replaced by the running mean (EMA buffer, updated in
      ``forward_train`` while training) of that modality's real tokens; no indicators.

    Args:
        spec: the inputs and outputs the dataset fixes, as :class:`CMMLNet` takes them.
        feature_dim: token width ``d``.
        encoder: builds every modality's encoder, as :class:`CMMLNet` calls it.
        mode: one of ``LATE_FUSION_MODES``.
        dropout_prob: modality dropout probability (``modality_dropout`` only).
        hidden_dim: MLP hidden width (default ``feature_dim``).
        dropout: dropout in the MLP.
        mean_momentum: EMA momentum of the running means (``mean_impute``).
        num_heads: attention heads of the table encoder (passed to ``encoder``).
        two_view: ``modality_dropout`` only: train on the observed and the dropped view (see above).

    Example::

        >>> from functools import partial
        >>> resnet10 = partial(MultiModalEncoder, image_encoder="resnet10")
        >>> net = LateFusionNet(InputSpec(2, 3, 2, 5, [0, 3]), feature_dim=32, encoder=resnet10)
        >>> net(torch.randn(4, 6, 32, 32), torch.randn(4, 2)).shape
        torch.Size([4, 5])
    """

    def __init__(
        self,
        spec: InputSpec,
        feature_dim: int = 256,
        encoder: Callable[..., nn.Module] = MultiModalEncoder,
        mode: str = "zero_fill",
        dropout_prob: float = 0.3,
        hidden_dim: int | None = None,
        dropout: float = 0.1,
        mean_momentum: float = 0.99,
        num_heads: int = 4,
        two_view: bool = False,
    ) -> None:
        # before any other local: the arguments as given, for the served model's description
        build_args = constructor_args(locals())
        super().__init__()
        self.build_args = build_args
        if mode not in LATE_FUSION_MODES:
            raise ValueError(f"mode must be one of {LATE_FUSION_MODES}, got {mode!r}.")
        if not 0.0 <= dropout_prob <= 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1], got {dropout_prob}.")
        if not 0.0 <= mean_momentum < 1.0:
            raise ValueError(f"mean_momentum must be in [0, 1), got {mean_momentum}.")
        self.mode = mode
        self.dropout_prob = dropout_prob
        # a switch may arrive as a command-line string ("true")
        self.two_view = as_bool(two_view, "two_view")
        if self.two_view and mode != "modality_dropout":
            raise ValueError(f"two_view needs mode='modality_dropout', got mode={mode!r}.")
        self.mean_momentum = mean_momentum
        if not callable(encoder):
            raise ValueError(f"encoder must be a class or callable that builds the module, got {encoder!r}.")
        self.spec = spec
        self.encoder = encoder(
            image_modalities=spec.image_modalities,
            image_channels=spec.image_channels,
            spatial_dims=spec.spatial_dims,
            tabular_cardinalities=None if spec.tabular_cardinalities is None else list(spec.tabular_cardinalities),
            feature_dim=feature_dim,
            num_heads=num_heads,
        )
        k = self.encoder.num_modalities
        self.num_modalities = k
        self.use_indicators = mode != "mean_impute"
        self.register_buffer("running_mean", torch.zeros(k, feature_dim))
        self.register_buffer("mean_initialized", torch.zeros(k, 1, dtype=torch.bool))
        hidden = hidden_dim or feature_dim
        in_dim = k * feature_dim + (k if self.use_indicators else 0)
        self.head = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, spec.num_classes)
        )

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """All parameters (one stage; the argument is accepted for a uniform trainer)."""
        return list(self.parameters())

    def _classify(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        keep = present.unsqueeze(-1)
        if self.mode == "mean_impute":
            filled = torch.where(keep, tokens, self.running_mean.to(tokens.dtype).expand_as(tokens))
            return self.head(filled.flatten(1))
        filled = tokens * keep.to(tokens.dtype)
        return self.head(torch.cat([filled.flatten(1), present.to(tokens.dtype)], dim=1))

    def forward(self, image: torch.Tensor, tabular: torch.Tensor | None = None) -> torch.Tensor:
        tokens, present = self.encoder(image, tabular)
        return self._classify(tokens, present)

    def forward_train(
        self, image: torch.Tensor, tabular: torch.Tensor | None = None, stage: int = 1
    ) -> dict[str, torch.Tensor]:
        """Returns ``logits`` and ``present`` (``stage`` is ignored); with ``two_view``, also ``logits_dropped``."""
        tokens, present = self.encoder(image, tabular)
        used = present
        if self.training and self.mode == "modality_dropout":
            used = random_keep_mask(present, self.dropout_prob)
        if self.training and self.mode == "mean_impute":
            with torch.no_grad():
                # modalities without a real token in the batch keep their mean
                mean = masked_mean(tokens.detach().transpose(0, 1), present.t(), dim=1)
                seen = present.any(dim=0).unsqueeze(-1)
                mean = mean.to(self.running_mean)
                moved = self.mean_momentum * self.running_mean + (1 - self.mean_momentum) * mean
                # the first batch that sees a modality sets its mean (no slow warm-up from zero)
                moved = torch.where(self.mean_initialized, moved, mean)
                self.running_mean.copy_(torch.where(seen, moved, self.running_mean))
                self.mean_initialized.copy_(self.mean_initialized | seen)
        if self.training and self.two_view:
            return {
                "logits": self._classify(tokens, present),
                "logits_dropped": self._classify(tokens, used),
                "present": present,
            }
        return {"logits": self._classify(tokens, used), "present": present}
