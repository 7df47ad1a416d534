"""Training-time augmentation of the packed image, applied to present modalities only.

The cached item is the packed ``image`` ``[M*C, *spatial]`` in which a missing modality is all-NaN
(the batch contract). A spatial transform applied to the whole tensor would resample NaN into the
present modalities' borders, and padding would turn a missing modality into zeros (present), so
:class:`AugmentPresentd` splits the channels per modality, augments each present one with its own
random draw and leaves a missing one exactly as it was. It is a random transform, so MONAI's
``CacheDataset`` / ``PersistentDataset`` keep the deterministic decoding in the cache and run only
this step per access.

Every method (CMML, baselines, ablations) trains with the same augmentation, so comparisons stay fair.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    Randomizable,
    RandScaleIntensity,
    RandShiftIntensity,
)
from monai.utils import convert_to_tensor

__all__ = ["AUGMENTATION_PRESETS", "AugmentPresentd", "augmentation_chain", "build_augmentation"]

#: ``"none"`` trains on the cached tensors as they are; ``"light"`` flips and small intensity
#: changes only; ``"default"`` adds a random affine (rotation, zoom, shift) per modality.
AUGMENTATION_PRESETS = ("none", "light", "default")


def augmentation_chain(spatial_dims: int, preset: str = "default") -> Compose:
    """Random MONAI array transforms for one present image modality ``[C, *spatial]``.

    The inputs are already intensity-normalised (2D: ImageNet mean/std per channel; 3D: z-score over
    the non-zero voxels), so intensity changes are scale and shift of the normalised values (contrast
    and brightness); a 2D colour jitter is the same per channel (``channel_wise``).

    Args:
        spatial_dims: 2 (photos, fundus images) or 3 (MRI volumes).
        preset: one of :data:`AUGMENTATION_PRESETS` other than ``"none"``.

    Returns:
        a ``Compose`` of random transforms that keeps the shape.

    Example:
        >>> chain = augmentation_chain(2, "default")
        >>> chain.set_random_state(0)(torch.zeros(3, 32, 32)).shape
        torch.Size([3, 32, 32])
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if preset not in AUGMENTATION_PRESETS or preset == "none":
        raise ValueError(f"preset must be one of {AUGMENTATION_PRESETS[1:]}, got {preset!r}")
    chain: list[Any] = [RandFlip(prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    if preset == "default":
        if spatial_dims == 2:
            # skin photos and fundus images have no canonical orientation: any rotation is plausible
            affine = RandAffine(
                prob=0.8,
                rotate_range=np.pi,
                scale_range=(0.15, 0.15),
                translate_range=(0.05, 0.05),
                padding_mode="reflection",
                mode="bilinear",
            )
        else:
            # MRI volumes are reoriented to RAS: only small rotations and zooms are realistic
            affine = RandAffine(
                prob=0.5,
                rotate_range=(0.1, 0.1, 0.1),
                scale_range=(0.1, 0.1, 0.1),
                padding_mode="zeros",
                mode="bilinear",
            )
        chain.append(affine)
    chain += [
        RandScaleIntensity(factors=0.1, prob=0.5, channel_wise=spatial_dims == 2),
        RandShiftIntensity(offsets=0.1, prob=0.5, channel_wise=spatial_dims == 2),
    ]
    if preset == "default":
        # contrast (gamma) needs non-negative values: MONAI rescales to [0, 1] and back internally
        chain.append(RandAdjustContrast(prob=0.3, gamma=(0.8, 1.25)))
    return Compose(chain)


class AugmentPresentd(Randomizable, MapTransform):
    """Augment each present image modality of the packed ``image`` with its own random draw.

    Args:
        channels: channels of each image modality, in packing order (modality i owns the channels
            after those of modalities 0..i-1).
        chain: random array transforms for one modality (e.g. :func:`augmentation_chain`).
        keys: the packed image key.

    Example:
        >>> aug = AugmentPresentd([3, 3], augmentation_chain(2)).set_random_state(0)
        >>> image = torch.randn(6, 32, 32); image[:3] = float("nan")     # first modality missing
        >>> out = aug({"image": image})["image"]
        >>> bool(out[:3].isnan().all()), bool(out[3:].isfinite().all())
        (True, True)
    """

    def __init__(self, channels: Sequence[int], chain: Compose, keys: KeysCollection = "image") -> None:
        MapTransform.__init__(self, keys)
        channels = [int(c) for c in channels]
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive channel counts, got {channels}")
        if not callable(chain):
            raise ValueError(f"chain must be callable, got {type(chain).__name__}")
        self.channels = channels
        self.chain = chain

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        # the chain draws from the same stream, so one seed fixes every modality's augmentation
        if isinstance(self.chain, Randomizable):
            self.chain.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:  # the chain randomises itself per call
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = convert_to_tensor(d[key], track_meta=False)
            if image.shape[0] != sum(self.channels):
                raise ValueError(
                    f"{key!r} has {image.shape[0]} channels but the modalities have {sum(self.channels)} "
                    f"({self.channels})"
                )
            parts, start = [], 0
            for c in self.channels:
                part = image[start : start + c]
                start += c
                if bool(torch.isnan(part).all()):
                    parts.append(part)  # missing: stays all-NaN
                else:
                    out = convert_to_tensor(self.chain(part), track_meta=False)
                    parts.append(out.to(part.dtype))
            d[key] = torch.cat(parts, dim=0)
        return d


def build_augmentation(
    channels: Sequence[int], spatial_dims: int, preset: str = "none", seed: int = 0
) -> AugmentPresentd | None:
    """The training augmentation of a dataset, or ``None`` for ``preset="none"``.

    Args:
        channels: channels of each image modality (``DatasetInfo.modality_channels``).
        spatial_dims: 2 or 3.
        preset: one of :data:`AUGMENTATION_PRESETS`.
        seed: seed of the augmentation draws (the run's seed: the same run augments the same way).

    Example:
        >>> build_augmentation([3, 3], 2, "none") is None
        True
    """
    if preset not in AUGMENTATION_PRESETS:
        raise ValueError(f"augmentation must be one of {AUGMENTATION_PRESETS}, got {preset!r}")
    if preset == "none":
        return None
    return AugmentPresentd(channels, augmentation_chain(spatial_dims, preset)).set_random_state(int(seed))
