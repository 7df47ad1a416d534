"""Transform chains: per-modality preprocessing and packing into the batch contract.

* :func:`image_transforms` builds the deterministic chain for one loaded, channel-first modality:
  2D: resize to ``spatial_size``, scale 8-bit values to [0, 1], normalise with mean/std per channel;
  3D: orientation RAS, resample to ``pixdim``, z-score over nonzero voxels, centre crop/pad to the
  fixed ROI ``spatial_size``.
* :class:`ApplyToPresentd` runs such a chain on each modality key that is not ``None``.
* :class:`PackModalitiesd` writes the batch contract of ``docs/architecture.md``: ``image``
  ``[M*C, *spatial]`` float32 (modality i in channels ``[i*C, (i+1)*C)``, NaN when missing),
  ``tabular`` float32 ``[F]`` (NaN per empty cell, all NaN when the table is missing), ``label``
  (int64 scalar or float32 ``[L]``) and ``case_id``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureType,
    MapTransform,
    NormalizeIntensity,
    Orientation,
    Resize,
    ResizeWithPadOrCrop,
    ScaleIntensityRange,
    Spacing,
    Transform,
)

from cmml_monai.data.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TableEncoder",
    "image_transforms",
    "resolve_pixdim",
    "ApplyToPresentd",
    "PackModalitiesd",
    "table_is_empty",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TableEncoder(Protocol):
    """What :class:`PackModalitiesd` needs of ``cmml_monai.data.table.TableSchema``."""

    @property
    def num_features(self) -> int: ...

    def encode(self, row: Mapping[str, Any]) -> np.ndarray: ...


def _check_size(spatial_size: Sequence[int], dims: int, name: str = "spatial_size") -> tuple[int, ...]:
    size = tuple(int(s) for s in spatial_size)
    if len(size) != dims or any(s < 1 for s in size):
        raise ValueError(f"{name} must be {dims} positive integers, got {list(spatial_size)}")
    return size


def resolve_pixdim(pixdim: Sequence[float] | str | None) -> tuple[float, float, float] | None:
    """The target 3D spacing as 3 floats, or None for the native spacing.

    ``"native"`` (or ``"none"``, any case) means None: MONAI's command line drops ``None``
    overrides, so ``--pixdim None`` cannot undo a dataset overlay's spacing but ``--pixdim native`` can.

    Raises:
        ValueError: anything but 3 positive numbers or those words.
    """
    if pixdim is None:
        return None
    if isinstance(pixdim, str):
        if pixdim.strip().lower() in ("native", "none"):
            return None
        raise ValueError(f"pixdim must be 3 positive spacings in mm or 'native', got {pixdim!r}")
    try:
        pix = tuple(float(p) for p in pixdim)
    except (TypeError, ValueError):
        raise ValueError(f"pixdim must be 3 positive spacings in mm or 'native', got {pixdim!r}") from None
    if len(pix) != 3 or any(p <= 0 for p in pix):
        raise ValueError(f"pixdim must be 3 positive spacings in mm or 'native', got {list(pix)}")
    return pix  # type: ignore[return-value]


def image_transforms(
    kind: str,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | str | None = None,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    keep_meta: bool = False,
) -> Compose:
    """Deterministic preprocessing of one loaded channel-first image modality.

    Args:
        kind: ``"image2d"`` (RGB ``[3, H, W]`` with 0..255 values) or ``"image3d"`` (``[1, X, Y, Z]``).
        spatial_size: output spatial shape, 2 values for 2D (H, W), 3 for 3D (the fixed ROI).
        pixdim: 3D only: target voxel spacing in mm (``None`` or ``"native"`` keeps the native spacing).
        mean: 2D only: per-channel mean subtracted after scaling to [0, 1] (``None``: no normalisation).
        std: 2D only: per-channel std the result is divided by.
        keep_meta: return a ``MetaTensor`` (affine, spacing) instead of a plain tensor; packing needs
            plain tensors, checks and debugging want the geometry.

    Returns:
        a ``Compose`` mapping a loaded image to float32 ``[C, *spatial_size]``.

    Example:
        >>> chain = image_transforms("image3d", (96, 96, 96), pixdim=(1.0, 1.0, 1.0))
        >>> chain(load_image("t1c.nii.gz", "image3d")).shape  # doctest: +SKIP
        torch.Size([1, 96, 96, 96])
    """
    pixdim = resolve_pixdim(pixdim)
    if kind == "image2d":
        size = _check_size(spatial_size, 2)
        if pixdim is not None:
            raise ValueError(f"pixdim is for 3D images only, got pixdim={pixdim} for kind 'image2d'")
        chain: list[Any] = [
            # photos are downsampled several-fold (768x512 -> 224): "area" averages without aliasing;
            # bilinear + anti_aliasing would darken the borders (its smoothing pads with zeros)
            Resize(size, mode="area"),
            ScaleIntensityRange(a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0, clip=True),
        ]
        if (mean is None) != (std is None):
            raise ValueError(f"mean and std must both be given or both be None, got mean={mean}, std={std}")
        if mean is not None and std is not None:
            if len(mean) != 3 or len(std) != 3 or any(float(s) <= 0 for s in std):
                raise ValueError(f"mean and std must have 3 values (RGB), std > 0, got mean={mean}, std={std}")
            chain.append(
                NormalizeIntensity(
                    subtrahend=[float(m) for m in mean], divisor=[float(s) for s in std], channel_wise=True
                )
            )
    elif kind == "image3d":
        size = _check_size(spatial_size, 3)
        chain = [Orientation(axcodes="RAS", labels=None)]  # labels from the image's space (RAS here)
        if pixdim is not None:
            chain.append(Spacing(pixdim=pixdim, mode="bilinear"))
        chain += [NormalizeIntensity(nonzero=True, channel_wise=True), ResizeWithPadOrCrop(size)]
    else:
        raise ValueError(f"kind must be 'image2d' or 'image3d', got {kind!r}")
    chain.append(EnsureType(data_type="tensor", dtype=torch.float32, track_meta=keep_meta))
    return Compose(chain)


class ApplyToPresentd(MapTransform):
    """Apply an array transform to each key whose value is not ``None`` (missing modalities pass).

    Args:
        keys: modality keys.
        transform: the (deterministic) chain to apply, e.g. from :func:`image_transforms`; a mapping
            ``key -> chain`` gives each key its own.
        allow_missing_keys: don't raise when a key is absent.

    Example:
        >>> t = ApplyToPresentd(["clinic", "derm"], image_transforms("image2d", (224, 224)))
        >>> t({"clinic": None, "derm": torch.rand(3, 512, 768) * 255})["derm"].shape
        torch.Size([3, 224, 224])
    """

    def __init__(
        self,
        keys: KeysCollection,
        transform: Transform | Compose | Mapping[Hashable, Any],
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(transform, Mapping):
            missing = [k for k in self.keys if k not in transform]
            if missing:
                raise ValueError(f"no transform given for keys {missing}")
            self.transforms = dict(transform)
        else:
            if not callable(transform):
                raise ValueError(f"transform must be callable, got {type(transform).__name__}")
            self.transforms = {k: transform for k in self.keys}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key] is not None:
                d[key] = self.transforms[key](d[key])
        return d


def table_is_empty(row: Mapping[str, Any] | None) -> bool:
    """True when ``row`` is ``None`` or all its cells are empty (None, NaN, blank string)."""
    if row is None:
        return True
    for v in row.values():
        if v is None or (isinstance(v, str) and v.strip() == ""):
            continue
        try:
            if isinstance(v, (float, np.floating)) and np.isnan(v):
                continue
        except TypeError:
            pass
        return False
    return True


class PackModalitiesd(MapTransform):
    """Pack per-modality images, the table row and the label into the batch contract.

    Args:
        keys: image modality keys, in packing order (``CaseList.image_modalities``).
        channels: channels per image modality (C); one value for all or one per key (all equal,
            the contract gives each modality the same C).
        spatial_size: the common spatial shape of the preprocessed modalities.
        schema: table encoder (``TableSchema``); ``None`` when the dataset has no table.
        table_key: key of the raw table row (``column -> value``).
        label_key: key of the label; an absent key is allowed only when ``with_label`` is False.
        multi_label: label is a 0/1 list (float32 ``[L]``) instead of a class index (int64 scalar).
        with_label: require and convert the label (False for inference manifests).
        case_key: key of the case id (kept as a string).
        drop_inputs: remove the per-modality and raw table keys after packing.

    Raises:
        DataError: a present modality whose shape is not ``[C, *spatial_size]``, or a missing label.

    Example:
        >>> pack = PackModalitiesd(["clinic", "derm"], 3, (224, 224))
        >>> out = pack({"case_id": "7", "clinic": None, "derm": torch.zeros(3, 224, 224), "label": 2})
        >>> out["image"].shape, bool(out["image"][:3].isnan().all())
        (torch.Size([6, 224, 224]), True)
    """

    def __init__(
        self,
        keys: KeysCollection,
        channels: int | Sequence[int],
        spatial_size: Sequence[int],
        schema: TableEncoder | None = None,
        table_key: str = "table",
        label_key: str = "label",
        multi_label: bool = False,
        with_label: bool = True,
        case_key: str = "case_id",
        image_key: str = "image",
        tabular_key: str = "tabular",
        drop_inputs: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        chans = [int(channels)] * len(self.keys) if isinstance(channels, int) else [int(c) for c in channels]
        if len(chans) != len(self.keys) or any(c < 1 for c in chans) or len(set(chans)) > 1:
            raise ValueError(
                f"channels must be one positive C shared by all image keys {list(self.keys)}, got {channels}"
            )
        self.channels = chans[0] if chans else 0
        self.spatial_size = tuple(int(s) for s in spatial_size)
        if len(self.spatial_size) not in (2, 3) or any(s < 1 for s in self.spatial_size):
            raise ValueError(f"spatial_size must be 2 or 3 positive integers, got {list(spatial_size)}")
        if schema is not None and not (hasattr(schema, "encode") and hasattr(schema, "num_features")):
            raise ValueError(f"schema must provide encode(row) and num_features, got {type(schema).__name__}")
        self.schema = schema
        self.table_key = table_key
        self.label_key = label_key
        self.multi_label = multi_label
        self.with_label = with_label
        self.case_key = case_key
        self.image_key = image_key
        self.tabular_key = tabular_key
        self.drop_inputs = drop_inputs

    def _label(self, value: Any, case: Any) -> torch.Tensor:
        try:
            if self.multi_label:
                out = torch.as_tensor(np.asarray(value, dtype=np.float32).reshape(-1))
                if out.numel() == 0 or not torch.isfinite(out).all():
                    raise ValueError("empty or non-finite")
                return out
            arr = np.asarray(value)
            if arr.size != 1 or float(arr) != int(arr):
                raise ValueError("not one integer")
            return torch.tensor(int(arr), dtype=torch.int64)
        except (TypeError, ValueError) as err:
            want = "a 0/1 list" if self.multi_label else "a class index"
            raise DataError(f"case {case}: label {value!r} is not {want} ({err}); fix the label column") from None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = d.get(self.case_key)
        c = self.channels
        image = torch.full((len(self.keys) * c, *self.spatial_size), float("nan"), dtype=torch.float32)
        for i, key in enumerate(self.keys):
            value = d.get(key)
            if value is None:
                continue  # missing modality: its channels stay NaN
            arr = torch.as_tensor(value).as_subclass(torch.Tensor).float()  # plain tensor: no per-item meta
            if tuple(arr.shape) != (c, *self.spatial_size):
                raise DataError(
                    f"case {case}, modality {key}: preprocessed shape {tuple(arr.shape)} is not "
                    f"{(c, *self.spatial_size)}; check the modality's channels and the spatial_size setting"
                )
            image[i * c : (i + 1) * c] = arr
        out: dict[Hashable, Any] = {k: v for k, v in d.items() if not (self.drop_inputs and k in self.keys)}
        out[self.image_key] = image
        if self.schema is not None:
            row = d.get(self.table_key)
            if table_is_empty(row):
                tab = np.full(int(self.schema.num_features), np.nan, dtype=np.float32)
            else:
                tab = np.asarray(self.schema.encode(row), dtype=np.float32)
            out[self.tabular_key] = torch.from_numpy(np.ascontiguousarray(tab))
        if self.drop_inputs:
            out.pop(self.table_key, None)
        if self.with_label:
            if d.get(self.label_key) is None:
                raise DataError(f"case {case}: no label; give every training/evaluation case a label")
            out[self.label_key] = self._label(d[self.label_key], case)
        elif d.get(self.label_key) is not None:
            out[self.label_key] = self._label(d[self.label_key], case)
        else:
            out.pop(self.label_key, None)
        if case is not None:
            out[self.case_key] = str(case)
        return out
