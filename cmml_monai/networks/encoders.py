"""Image encoders (MONAI ResNet / DenseNet, 2D or 3D) and the multimodal "encode once" front end."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets import DenseNet121
from monai.networks.nets import resnet as monai_resnet
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck, get_medicalnet_pretrained_resnet_args

from cmml_monai.networks.feature_cache import FeatureCache
from cmml_monai.networks.pretrained import (
    EFFICIENTNET_BN,
    EFFICIENTNET_LITE,
    EfficientNetFeatures,
    efficientnet_backbone,
    nest_block_keys,
)
from cmml_monai.networks.tabular import TabularEncoder
from cmml_monai.networks.utils import presence_from_nan
from cmml_monai.utils import as_bool

__all__ = [
    "IMAGE_ENCODERS",
    "build_image_backbone",
    "load_pretrained",
    "ImageEncoder",
    "MultiModalEncoder",
    "attach_feature_cache",
]

logger = logging.getLogger(__name__)

# name -> (block, layers); all ResNets use MONAI's ResNet with the standard 64..512 widths
_RESNETS = {
    "resnet10": (ResNetBlock, [1, 1, 1, 1]),
    "resnet18": (ResNetBlock, [2, 2, 2, 2]),
    "resnet34": (ResNetBlock, [3, 4, 6, 3]),
    "resnet50": (ResNetBottleneck, [3, 4, 6, 3]),
}
IMAGE_ENCODERS = tuple(_RESNETS) + ("densenet121",) + tuple(EFFICIENTNET_LITE) + EFFICIENTNET_BN


class _DenseNetFeatures(nn.Module):
    """MONAI DenseNet121 trunk + ReLU + global average pooling (its classifier is dropped)."""

    def __init__(self, spatial_dims: int, in_channels: int, pretrained: bool = False) -> None:
        super().__init__()
        net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1, pretrained=pretrained)
        self.features = net.features
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.features(x))).flatten(1)


def _resnet(name: str, spatial_dims: int, in_channels: int, pretrained: bool, load_weights: bool) -> nn.Module:
    """MONAI's ResNet; ``pretrained`` (3D only) takes MedicalNet's layout and, with ``load_weights``, its weights."""
    block, layers = _RESNETS[name]
    if not pretrained:
        return ResNet(
            block,
            layers,
            [64, 128, 256, 512],
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=False,
            bias_downsample=False,
        )
    if spatial_dims != 3 or in_channels != 1:
        raise ValueError(
            f"{name}: MONAI's pretrained ResNets are MedicalNet's 3D single-channel weights, got spatial_dims="
            f"{spatial_dims}, in_channels={in_channels}; for 2D ImageNet weights use efficientnet-lite0"
        )
    bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(int(name[len("resnet") :]))
    factory = getattr(monai_resnet, name)
    return factory(
        pretrained=load_weights,
        spatial_dims=3,
        n_input_channels=1,
        feed_forward=False,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type=shortcut,
        bias_downsample=bias_downsample,
    )


def build_image_backbone(
    name: str, spatial_dims: int, in_channels: int, pretrained: bool = False, load_weights: bool = True
) -> tuple[nn.Module, int]:
    """Build a MONAI backbone that maps ``[B, C, *spatial]`` to pooled features ``[B, F]``.

    Args:
        name: one of ``IMAGE_ENCODERS``.
        spatial_dims: 2 or 3.
        in_channels: input channels of one modality.
        pretrained: the published weights of ``name``: EfficientNet-Lite's ImageNet weights from the installed
            ``[pretrained]`` extra (offline); MONAI's ImageNet weights of ``efficientnet-b*`` and
            ``densenet121`` and MedicalNet's 3D ResNet weights (MONAI downloads them: a connected machine).
        load_weights: with ``pretrained``, load the weights; False builds the same layout for a local
            weights file (``pretrained_path``).

    Returns:
        ``(module, F)``.

    Example::

        >>> net, width = build_image_backbone("resnet10", 2, 3)
        >>> net(torch.randn(2, 3, 32, 32)).shape, width
        (torch.Size([2, 512]), 512)
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    pretrained = as_bool(pretrained, "pretrained")
    if name in _RESNETS:
        return _resnet(name, spatial_dims, in_channels, pretrained, load_weights), 512 * _RESNETS[name][0].expansion
    if name == "densenet121":
        return _DenseNetFeatures(spatial_dims, in_channels, pretrained and load_weights), 1024
    if name in EFFICIENTNET_LITE or name in EFFICIENTNET_BN:
        net = efficientnet_backbone(name, spatial_dims, in_channels, pretrained and load_weights)
        return net, int(net.width)
    raise ValueError(f"image_encoder must be one of {IMAGE_ENCODERS}, got {name!r}.")


def _read_state(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ValueError(f"pretrained_path {path!r} is not an existing file (weights are only read from local files).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # MedicalNet, Lightning
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained_path {path!r} holds a {type(state).__name__}, not a state dict.")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def load_pretrained(module: nn.Module, path: str) -> int:
    """Load a local state dict into a backbone of :func:`build_image_backbone`; returns the tensors loaded.

    Keys may carry ``module.`` or sit under ``state_dict`` (MedicalNet); EfficientNet files in the flat
    ``_blocks.<k>`` layout (EfficientNet-PyTorch, MONAI's download) are mapped to MONAI's nested blocks. File
    tensors the backbone has no place for (a classifier) are skipped; a partial load says how many tensors
    were loaded. Nothing is downloaded.

    Raises:
        ValueError: the file does not exist, a tensor's shape differs from the backbone's (named), or no key
            matches.

    Example:
        >>> net, _ = build_image_backbone("resnet10", 3, 1)
        >>> load_pretrained(net, "resnet_10_23dataset.pth")  # doctest: +SKIP
        63
    """
    state = _read_state(path)
    own = module.state_dict()
    if isinstance(module, EfficientNetFeatures):  # the MONAI EfficientNet sits under "net."
        state = {f"net.{k}": v for k, v in nest_block_keys(state, module.net).items()}
    clean = {k: v for k, v in state.items() if k in own}
    wrong = [
        f"{k} {tuple(v.shape)} (encoder {tuple(own[k].shape)})" for k, v in clean.items() if v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(
            f"pretrained_path {path!r}: {len(wrong)} tensors do not fit the {type(module).__name__} "
            f"encoder, e.g. {wrong[:3]}: check image_encoder and its layout."
        )
    if not clean:
        raise ValueError(f"pretrained_path {path!r}: no key matches the {type(module).__name__} encoder.")
    missing = [k for k in own if k not in clean]
    unused = [k for k in state if k not in own]
    if missing:
        warnings.warn(
            f"pretrained_path {path!r}: loaded {len(clean)} of {len(own)} encoder tensors; "
            f"{len(missing)} not in the file, e.g. {missing[:3]}."
        )
    logger.info(
        "pretrained_path %s: loaded %d of %d encoder tensors (%d file tensors unused, e.g. %s)",
        path,
        len(clean),
        len(own),
        len(unused),
        unused[:2],
    )
    module.load_state_dict(clean, strict=False)
    return len(clean)


class ImageEncoder(nn.Module):
    """One image modality (or a shared encoder): backbone -> pooled features -> ``d``-dim token.

    Args:
        image_encoder: backbone name, one of ``IMAGE_ENCODERS``.
        spatial_dims: 2 or 3.
        in_channels: channels of one modality.
        feature_dim: token width ``d``.
        pretrained_path: optional local state dict for the backbone.
        pretrained: the backbone's published weights (see :func:`build_image_backbone`); with
            ``pretrained_path``, the layout of those weights filled from the local file.
        freeze_backbone: the backbone is not trained and its BatchNorm statistics stay as loaded (it is kept
            in eval mode); only the projection to the token trains. A :class:`FeatureCache` can then serve
            its features.

    Example::

        >>> ImageEncoder("resnet10", 2, 3, 32)(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 32])
    """

    __jit_ignored_attributes__ = ["feature_cache"]

    def __init__(
        self,
        image_encoder: str,
        spatial_dims: int,
        in_channels: int,
        feature_dim: int,
        pretrained_path: str | None = None,
        pretrained: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.backbone, width = build_image_backbone(
            image_encoder, spatial_dims, in_channels, pretrained, load_weights=not pretrained_path
        )
        if pretrained_path:
            load_pretrained(self.backbone, pretrained_path)
        self.proj = nn.Sequential(nn.Linear(width, feature_dim), nn.LayerNorm(feature_dim))
        self.freeze_backbone = as_bool(freeze_backbone, "freeze_backbone")
        self.feature_cache: FeatureCache | None = None
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        if self.freeze_backbone:  # frozen BatchNorm statistics: the backbone never leaves eval mode
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript drops the other branch: the cache is eager only
            feats = self.backbone(x)
        else:
            feats = self._features(x)
        return self.proj(feats)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.feature_cache is None or torch.jit.is_tracing():
            return self.backbone(x)
        return self.feature_cache(self.backbone, x)


def _encode_rows(encoder: nn.Module, x: torch.Tensor, mask: torch.Tensor, dim: int, training: bool) -> torch.Tensor:
    """Encode only the rows of ``x`` where ``mask``; the other rows get zero tokens."""
    idx = mask.nonzero().squeeze(1)
    n = int(idx.numel())
    if n == x.shape[0] or (training and n < 2):  # BatchNorm needs 2 samples in training
        return encoder(x)
    out = x.new_zeros((x.shape[0], dim))
    if n == 0:
        return out
    feats = encoder(x.index_select(0, idx))
    return out.to(feats.dtype).index_copy(0, idx, feats)


class MultiModalEncoder(nn.Module):
    """Encode every modality once: ``(image, tabular) -> (tokens [B, k, d], present [B, k])``.

    Presence comes from the NaNs (``presence_from_nan``). Missing image modalities are encoded as
    zeros (keeps the batch vectorised; their content is zeroed first so it cannot matter) and the
    tokens of missing modalities are set to 0 here; the methods replace them (learned token,
    mean, ...). The table, when the network has one, is the last modality.

    Args:
        image_modalities: number of image modalities ``M``.
        image_channels: channels per modality ``C``.
        spatial_dims: 2 or 3.
        tabular_cardinalities: table feature cardinalities, or None for no table.
        feature_dim: token width ``d``.
        image_encoder: backbone name.
        share_image_encoder: one backbone for all image modalities (e.g. left/right fundus).
        pretrained_path: optional local state dict loaded into every image backbone.
        pretrained: every image backbone starts from its published weights (see :func:`build_image_backbone`;
            ``efficientnet-lite0/1/2`` offline from the ``[pretrained]`` extra).
        freeze_backbone: the image backbones are not trained, their BatchNorm statistics frozen
            (:class:`ImageEncoder`); their features can then be cached (:func:`attach_feature_cache`).
        tabular_layers: transformer layers of the table encoder.
        num_heads: attention heads of the table encoder.
        encode_present_only: in eager mode, run each image encoder only on the cases where its
            modality is present (gather / scatter; saves the compute of missing images and keeps
            them out of the BatchNorm statistics). Traced / scripted models always take the
            vectorised path, which gives the same tokens in eval mode. In training, a modality
            present in fewer than 2 cases of the batch falls back to the vectorised path (BatchNorm
            needs 2 samples). Costs one host sync per modality and step on GPU.

    Example::

        >>> enc = MultiModalEncoder(2, 3, 2, [0, 2], feature_dim=32, image_encoder="resnet10")
        >>> tokens, present = enc(torch.randn(2, 6, 16, 16), torch.randn(2, 2))
        >>> tokens.shape, present.shape
        (torch.Size([2, 3, 32]), torch.Size([2, 3]))
    """

    def __init__(
        self,
        image_modalities: int,
        image_channels: int,
        spatial_dims: int,
        tabular_cardinalities: Sequence[int] | None = None,
        feature_dim: int = 256,
        image_encoder: str = "resnet18",
        share_image_encoder: bool = False,
        pretrained_path: str | None = None,
        tabular_layers: int = 1,
        num_heads: int = 4,
        encode_present_only: bool = False,
        pretrained: bool = False,
        freeze_backbone: bool = False,
    ) -> None:
        super().__init__()
        # switches may arrive as command-line strings ("false")
        share_image_encoder = as_bool(share_image_encoder, "share_image_encoder")
        encode_present_only = as_bool(encode_present_only, "encode_present_only")
        if image_modalities < 1:
            raise ValueError(f"image_modalities must be >= 1, got {image_modalities}.")
        if image_channels < 1:
            raise ValueError(f"image_channels must be >= 1, got {image_channels}.")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}.")
        self.image_modalities = image_modalities
        self.image_channels = image_channels
        self.feature_dim = feature_dim
        self.share_image_encoder = share_image_encoder
        self.encode_present_only = encode_present_only
        n_enc = 1 if share_image_encoder else image_modalities
        self.image_encoders = nn.ModuleList(
            [
                ImageEncoder(
                    image_encoder,
                    spatial_dims,
                    image_channels,
                    feature_dim,
                    pretrained_path,
                    pretrained,
                    freeze_backbone,
                )
                for _ in range(n_enc)
            ]
        )
        self.tabular_encoder = (
            TabularEncoder(tabular_cardinalities, feature_dim, tabular_layers, num_heads)
            if tabular_cardinalities is not None
            else None
        )
        self.num_features = 0 if self.tabular_encoder is None else self.tabular_encoder.num_features
        self.num_modalities = image_modalities + (1 if self.tabular_encoder is not None else 0)

    def encode(
        self,
        image_clean: torch.Tensor,
        tabular_clean: torch.Tensor | None,
        cell_mask: torch.Tensor | None,
        present: torch.Tensor,
    ) -> torch.Tensor:
        """Encode NaN-free inputs under an explicit ``present`` mask; missing tokens are 0."""
        b = image_clean.shape[0]
        m, c = self.image_modalities, self.image_channels
        # zero the images of missing modalities so their content cannot reach the encoders
        img_keep = present[:, :m].repeat_interleave(c, dim=1).reshape([b, m * c] + [1] * (image_clean.dim() - 2))
        image_clean = image_clean * img_keep.to(image_clean.dtype)
        if torch.jit.is_scripting():  # TorchScript drops the other branch when compiling
            tokens = self._encode_images(image_clean, present)
        elif self.encode_present_only and not torch.jit.is_tracing():
            tokens = self._encode_images_present(image_clean, present)
        else:
            tokens = self._encode_images(image_clean, present)
        if self.tabular_encoder is not None and tabular_clean is not None and cell_mask is not None:
            tab = self.tabular_encoder(tabular_clean, cell_mask & present[:, -1:])
            tokens = torch.cat([tokens, tab.unsqueeze(1).to(tokens.dtype)], dim=1)
        return tokens * present.unsqueeze(-1).to(tokens.dtype)

    def _encode_images(self, image_clean: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Vectorised: every encoder runs on its whole batch slice (missing images are zeros)."""
        b = image_clean.shape[0]
        m, c = self.image_modalities, self.image_channels
        if self.share_image_encoder:
            flat = image_clean.reshape([b * m, c] + list(image_clean.shape[2:]))
            return self.image_encoders[0](flat).reshape(b, m, self.feature_dim)
        parts = [enc(image_clean[:, i * c : (i + 1) * c]) for i, enc in enumerate(self.image_encoders)]
        return torch.stack(parts, dim=1)

    def _encode_images_present(self, image_clean: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Eager only: every encoder runs on the present cases of its modality (gather / scatter)."""
        b = image_clean.shape[0]
        m, c = self.image_modalities, self.image_channels
        if self.share_image_encoder:
            flat = image_clean.reshape([b * m, c] + list(image_clean.shape[2:]))
            return _encode_rows(
                self.image_encoders[0], flat, present[:, :m].reshape(b * m), self.feature_dim, self.training
            ).reshape(b, m, self.feature_dim)
        parts = [
            _encode_rows(enc, image_clean[:, i * c : (i + 1) * c], present[:, i], self.feature_dim, self.training)
            for i, enc in enumerate(self.image_encoders)
        ]
        return torch.stack(parts, dim=1)

    def forward(self, image: torch.Tensor, tabular: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if tabular is not None and self.tabular_encoder is None:
            raise ValueError("tabular was given but the network was built without tabular_cardinalities.")
        present, image_clean, tabular_clean, cell_mask = presence_from_nan(
            image, tabular, self.image_modalities, self.image_channels, self.num_features
        )
        return self.encode(image_clean, tabular_clean, cell_mask, present), present


def attach_feature_cache(network: nn.Module, cache_dir: str | None = None) -> nn.Module:
    """Serve the features of every frozen image backbone of ``network`` from a :class:`FeatureCache`.

    Each image is encoded once per content (per augmentation draw when the images are augmented); with
    ``cache_dir`` the features are also kept on disk, keyed by the backbone's weights, so later runs with the
    same frozen backbone (other methods, seeds) reuse them. Trainable backbones are left as they are.

    Args:
        network: a network of this package (its image encoders are :class:`ImageEncoder`).
        cache_dir: folder of the on-disk cache (``None``: memory only).

    Returns:
        ``network`` (for use inside a config expression).

    Example:
        >>> enc = partial(MultiModalEncoder, image_encoder="efficientnet-lite0", freeze_backbone=True)  # doctest: +SKIP
        >>> net = CMMLNet(InputSpec(2, 3, 2, 5), encoder=enc)  # doctest: +SKIP
        >>> net = attach_feature_cache(net, "outputs/features")  # doctest: +SKIP
    """
    frozen = [m for m in network.modules() if isinstance(m, ImageEncoder) and m.freeze_backbone]
    for module in frozen:
        module.feature_cache = FeatureCache(module.backbone, cache_dir)
    if frozen:
        logger.info("feature cache: %d frozen image backbone(s), on disk under %s", len(frozen), cache_dir)
    return network
