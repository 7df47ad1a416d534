"""What the model looked at, per case: a saliency map for each present image modality.

The map of a modality is MONAI's :class:`~monai.visualize.GradCAM` on that modality's image encoder (the last
convolutional stage of its MONAI ResNet, DenseNet or EfficientNet backbone), for the predicted class, computed on
a copy of the served eager network at batch 1. A TorchScript module has no submodules to hook, so it gets MONAI's
:class:`~monai.visualize.OcclusionSensitivity` instead (black box: the modality's image is occluded patch by
patch, the other inputs stay as they are; many forward passes, so slower). A missing modality gets no map and
is marked :data:`MISSING_COMPLETED` for a method that fills it in (CMML's CRTA, mean imputation) or
:data:`MISSING_NOT_USED` (zero fill, modality dropout); the caller says which (``completes``: see
:func:`cmml_monai.deploy.completes_missing`).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
from monai.visualize import GradCAM, ModelWithHooks, OcclusionSensitivity

from cmml_monai.networks import EfficientNetFeatures

__all__ = [
    "PRESENT",
    "MISSING_COMPLETED",
    "MISSING_NOT_USED",
    "EXPLAIN_METHODS",
    "ModalityMap",
    "CaseExplanation",
    "Explainer",
    "missing_marking",
]

PRESENT = "present"
MISSING_COMPLETED = "missing \u2014 completed by the model"
MISSING_NOT_USED = "missing \u2014 not used"
EXPLAIN_METHODS = ("auto", "gradcam", "occlusion")


def missing_marking(completes: bool) -> str:
    """How a missing input is marked: completed by the model (CMML, mean imputation) or not used.

    Example:
        >>> missing_marking(False)
        'missing — not used'
    """
    return MISSING_COMPLETED if completes else MISSING_NOT_USED


@dataclass
class ModalityMap:
    """One image modality of a case.

    Args:
        name: the modality's name.
        image: the network's input ``[C, *spatial]`` (preprocessed), None when missing.
        saliency: ``[*spatial]`` in [0, 1] (1 = the strongest evidence for the explained class), None when missing.
        status: :data:`PRESENT` or the missing marking.
    """

    name: str
    image: np.ndarray | None
    saliency: np.ndarray | None
    status: str


@dataclass
class CaseExplanation:
    """Everything the case page shows; no patient identifier (the case is named by its id or pseudonym).

    Args:
        case_id: the case's id or pseudonym.
        probabilities: class -> probability.
        target: the class the maps explain (the most probable one).
        method: ``"Grad-CAM"`` or ``"occlusion"``.
        maps: one per image modality, in the model's order.
        spatial_dims: 2 or 3.
        table: column -> the raw value given (None: the cell is empty); None when the model has no table.
        table_status: :data:`PRESENT` or the missing marking (None without a table).
        completed: the missing inputs the model filled in.
    """

    case_id: str
    probabilities: dict[str, float]
    target: str
    method: str
    maps: list[ModalityMap]
    spatial_dims: int
    table: dict[str, Any] | None = None
    table_status: str | None = None
    completed: list[str] = field(default_factory=list)


class _ModalityView(nn.Module):
    """The network as a function of one modality's image: the case's other inputs stay fixed."""

    def __init__(
        self, network: nn.Module, image: torch.Tensor, tabular: torch.Tensor | None, start: int, channels: int
    ) -> None:
        super().__init__()
        self.network, self.image, self.tabular = network, image, tabular
        self.start, self.channels = start, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        full = self.image.expand(n, *self.image.shape[1:]).clone()
        full[:, self.start : self.start + self.channels] = x
        if self.tabular is None:  # a traced module takes exactly the inputs it was traced with
            return self.network(full)
        return self.network(full, self.tabular.expand(n, -1))


class _OnePassHooks(ModelWithHooks):
    """MONAI's hooks on several layers, run once per case: GradCAM then reads each layer from that one pass
    (``last`` is reset by the caller before each case)."""

    last: tuple[Any, Any, Any] | None = None

    def __call__(self, x: torch.Tensor, class_idx: Any = None, retain_graph: bool = False, **kwargs: Any) -> Any:
        if self.last is None:
            self.last = super().__call__(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        return self.last


def _last_stage(backbone: Any) -> str | None:
    """The name of a backbone's last convolutional stage inside it (None: not a known backbone)."""
    if hasattr(backbone, "layer4"):  # ResNet
        return "layer4"
    if hasattr(backbone, "features"):  # DenseNet: the ReLU after the last norm, before pooling
        return "act"
    if isinstance(backbone, EfficientNetFeatures):  # the head's norm: its activation module also serves the stem
        return "net._bn1"
    return None


def _unit(x: torch.Tensor) -> np.ndarray:
    """``x`` scaled to [0, 1] by its maximum (all zeros stay zeros)."""
    x = torch.nan_to_num(x.detach().float().clamp_min(0))
    top = float(x.max()) if x.numel() else 0.0
    return (x / top if top > 0 else x).cpu().numpy().astype(np.float32)


class Explainer:
    """Saliency maps of the present image modalities of one case at a time.

    Args:
        network: the served network (eager, or TorchScript: then occlusion is used), called as
            ``network(image, tabular)``.
        modalities: ``(name, channels)`` of each image modality, in the model's order.
        completes: whether the method fills in a missing modality (see :func:`missing_marking`).
        class_names: the classes (or labels), in the logits' order.
        multi_label: sigmoid per label (else softmax).
        table_name: the table modality's name (None: no table).
        method: ``"auto"`` (Grad-CAM where the encoder has a known convolutional stage, else occlusion),
            ``"gradcam"`` or ``"occlusion"``.
        mask_size: occlusion patch size per spatial dimension (default: a sixth of each side in 2D, windows
            overlapping by half; a quarter in 3D, overlapping by a quarter).

    Raises:
        ValueError: an unknown ``method``, or ``"gradcam"`` for a network without hookable image encoders.

    Example:
        >>> ex = Explainer(net, [("clinic", 3), ("derm", 3)], completes=True, class_names=["a", "b"])  # doctest: +SKIP
        >>> ex(batch["image"][:1], batch["tabular"][:1], "case-1").maps[0].saliency.shape  # doctest: +SKIP
        (224, 224)
    """

    def __init__(
        self,
        network: nn.Module,
        modalities: Sequence[tuple[str, int]],
        completes: bool,
        class_names: Sequence[str],
        multi_label: bool = False,
        table_name: str | None = None,
        method: str = "auto",
        mask_size: Sequence[int] | None = None,
    ) -> None:
        if method not in EXPLAIN_METHODS:
            raise ValueError(f"method must be one of {EXPLAIN_METHODS}, got {method!r}")
        if not modalities:
            raise ValueError("modalities is empty: there is no image modality to explain")
        self.modalities = [(str(n), int(c)) for n, c in modalities]
        self.completes = bool(completes)
        self.class_names = [str(c) for c in class_names]
        self.multi_label = bool(multi_label)
        self.table_name = table_name
        self.mask_size = None if mask_size is None else tuple(int(m) for m in mask_size)
        scripted = isinstance(network, torch.jit.ScriptModule)
        layers = None if scripted else self._target_layers(network)
        if method == "gradcam" and layers is None:
            raise ValueError(
                "method='gradcam' needs the eager network with MONAI ResNet/DenseNet image encoders; "
                "use 'occlusion' (or 'auto') for a TorchScript module"
            )
        self.method = "occlusion" if method == "occlusion" or layers is None else "gradcam"
        self.layers = layers
        #: how the page names the maps
        self.method_name = "Grad-CAM" if self.method == "gradcam" else "occlusion"
        # MONAI's hooks stay on the module they are put on: a copy keeps them off the served network
        self.network = copy.deepcopy(network).eval() if self.method == "gradcam" else network
        self._cams: dict[tuple[str, ...], GradCAM] = {}

    @staticmethod
    def _target_layers(network: nn.Module) -> list[str] | None:
        """Per image modality, the name of its encoder's last convolutional stage (None: not a known encoder)."""
        encoders = getattr(getattr(network, "encoder", None), "image_encoders", None)
        if not isinstance(encoders, nn.ModuleList):
            return None
        encoder: Any = getattr(network, "encoder", None)
        shared = bool(getattr(encoder, "share_image_encoder", False))
        names = []
        for i in range(int(encoder.image_modalities)):
            stage = _last_stage(getattr(encoders[0 if shared else i], "backbone", None))
            if stage is None:
                return None
            names.append(f"encoder.image_encoders.{0 if shared else i}.backbone.{stage}")
        return names

    def _present(self, image: torch.Tensor) -> list[bool]:
        out, start = [], 0
        for _, channels in self.modalities:
            out.append(not bool(torch.isnan(image[0, start : start + channels]).all()))
            start += channels
        return out

    def _logits(self, image: torch.Tensor, tabular: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            out = self.network(image) if tabular is None else self.network(image, tabular)
        return out.float()

    def _gradcam(
        self, image: torch.Tensor, tabular: torch.Tensor | None, present: list[bool]
    ) -> tuple[torch.Tensor, dict[int, np.ndarray]]:
        """One forward and one backward pass: the logits and the map of every present modality (the predicted
        class's)."""
        assert self.layers is not None  # gradcam is chosen only with known layers
        names = self.layers
        wanted = [i for i, p in enumerate(present) if p]
        layers = tuple(dict.fromkeys(names[i] for i in wanted))
        if layers not in self._cams:  # hooks go on once per pattern of present modalities, not once per case
            hooks = _OnePassHooks(self.network, layers, register_forward=True, register_backward=True)
            # MONAI's GradCAM takes the hooked model and several layer names, though typed for one module and name
            self._cams[layers] = GradCAM(cast(Any, hooks), target_layers=cast(Any, layers), postprocessing=lambda m: m)
        cam = self._cams[layers]
        hooked = cast(_OnePassHooks, cam.nn_module)
        hooked.last = None
        # the input needs a gradient path even when the weights are frozen
        x = image.detach().clone().requires_grad_(True)
        kwargs = {} if tabular is None else {"tabular": tabular}
        out = {}
        with torch.enable_grad():
            for i in wanted:
                maps = cam(x, class_idx=None, layer_idx=layers.index(names[i]), **kwargs)
                # a shared encoder sees the modalities as one batch (all of them, or the present ones only)
                row = 0 if maps.shape[0] == 1 else i if maps.shape[0] == len(present) else sum(present[:i])
                out[i] = _unit(maps[row, 0])
        assert hooked.last is not None
        return hooked.last[0].detach().float(), out

    def _occlusion(
        self, image: torch.Tensor, tabular: torch.Tensor | None, index: int, target: int, prob: float
    ) -> np.ndarray:
        start = sum(c for _, c in self.modalities[:index])
        channels = self.modalities[index][1]
        spatial = image.shape[2:]
        flat = len(spatial) == 2
        size = self.mask_size or tuple(max(1, s // (6 if flat else 4)) for s in spatial)
        view = _ModalityView(self.network, image, tabular, start, channels)
        # the activation is given: MONAI's default picks sigmoid for a one-channel image, whatever the classes
        activate = torch.sigmoid if self.multi_label else functools.partial(torch.softmax, dim=1)
        occ = OcclusionSensitivity(
            view,
            mask_size=size,
            n_batch=8,
            verbose=False,
            mode="mean_img",
            overlap=0.5 if flat else 0.25,
            activate=activate,
        )
        with torch.no_grad(), warnings.catch_warnings():
            # MONAI's sliding window indexes with a list, which this torch version warns about on every patch
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
            occ_map, _ = occ(image[:, start : start + channels])
        # evidence = how much the class's probability drops when the region is hidden ([B, classes, *spatial])
        return _unit(prob - occ_map[0, target])

    def __call__(
        self,
        image: torch.Tensor,
        tabular: torch.Tensor | None,
        case_id: str,
        table_values: Mapping[str, Any] | None = None,
    ) -> CaseExplanation:
        """Explain one case: ``image`` ``[1, M*C, *spatial]`` (NaN where missing), ``tabular`` ``[1, F]`` or None;
        ``table_values`` the raw table cells given (for the page).

        Raises:
            ValueError: a batch of more than one case.
        """
        if image.shape[0] != 1:
            raise ValueError(f"the explainer takes one case at a time, got a batch of {image.shape[0]}")
        device = next(iter(self.network.parameters())).device
        image = image.to(device)
        tabular = None if tabular is None else tabular.to(device)
        present = self._present(image)
        saliency: dict[int, np.ndarray] = {}
        if self.method == "gradcam" and any(present):
            logits, saliency = self._gradcam(image, tabular, present)  # explains the argmax of these logits
        else:
            logits = self._logits(image, tabular)
        probs = (torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1))[0].cpu()
        target = int(probs.argmax())
        marking = missing_marking(self.completes)
        maps, start = [], 0
        for i, (name, channels) in enumerate(self.modalities):
            if present[i]:
                sal = (
                    saliency[i]
                    if self.method == "gradcam"
                    else self._occlusion(image, tabular, i, target, float(probs[target]))
                )
                pixels = image[0, start : start + channels].detach().cpu().numpy().astype(np.float32)
                maps.append(ModalityMap(name, pixels, sal, PRESENT))
            else:
                maps.append(ModalityMap(name, None, None, marking))
            start += channels
        table_status = None
        if self.table_name is not None:
            has_table = tabular is not None and not bool(torch.isnan(tabular).all())
            table_status = PRESENT if has_table else marking
        missing = [m.name for m in maps if m.status != PRESENT]
        if table_status not in (None, PRESENT):
            missing.append(str(self.table_name))
        return CaseExplanation(
            case_id=str(case_id),
            probabilities={c: float(p) for c, p in zip(self.class_names, probs)},
            target=self.class_names[target],
            method=self.method_name,
            maps=maps,
            spatial_dims=image.dim() - 2,
            table=None if self.table_name is None else dict(table_values or {}),
            table_status=table_status,
            completed=missing if self.completes else [],
        )
