"""The served network's description: what rebuilding it needs, written beside ``models/model.pt``.

Training builds the network from the training data (``configs/train.json``: ``network_def`` reads
``@info``, which is built from the dataset). A served model must not need that data, so the run writes
``<output_dir>/models/network.json`` when it publishes the weights: the network class (``network_def``'s
``_target_``), its resolved constructor arguments (every ``network_def`` override included), the method's
name, the modalities, classes, table schema and the preprocessing. :func:`load_network` rebuilds the
network from that file alone and loads the weights. Each argument is written as the config gives it: a
component factory (``"_mode_": "callable"``) or an options object (:class:`cmml_monai.networks.InputSpec`,
:class:`cmml_monai.networks.CMMLOptions`) as ``{"_target_": path, **its options}``. Only this version is read;
an older file is refused with the command that writes it again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from cmml_monai.data.cases import CaseList
from cmml_monai.data.errors import DataError
from cmml_monai.data.jsonio import atomic_write_json
from cmml_monai.data.table import TableSchema
from cmml_monai.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resolve_pixdim
from cmml_monai.networks import CMMLNet

__all__ = [
    "DESCRIPTION_NAME",
    "DESCRIPTION_VERSION",
    "WEIGHTS_NAME",
    "describe_network",
    "described_method",
    "described_image_encoder",
    "save_description",
    "load_description",
    "check_description",
    "resolve_model_dir",
    "description_schema",
    "description_preprocessing",
    "build_from_description",
    "load_network",
    "completes_missing",
    "file_sha256",
]

logger = logging.getLogger(__name__)

DESCRIPTION_NAME = "network.json"
DESCRIPTION_VERSION = 3
WEIGHTS_NAME = "model.pt"
_FORMAT = "cmml-monai network description"
# constructor or component options that point at files of the training machine: the served weights replace them
_DROPPED_ARGS = ("pretrained_path", "pretrained")
# a description may only name a network class of this package (it is a data file, not code)
_NETWORKS_PACKAGE = "cmml_monai.networks"


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain JSON types (tuples -> lists, numpy scalars -> Python, a network component's class or
    ``functools.partial`` and an options dataclass -> ``{"_target_": path, **its options}`` as the config writes
    it); anything else is an error, so a description never holds a value that cannot be read back as it was."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _plain(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
        return {"_target_": _target_of(type(value)), **fields}
    if isinstance(value, functools.partial) or isinstance(value, type):
        func = value.func if isinstance(value, functools.partial) else value
        if isinstance(value, functools.partial) and value.args:
            raise ValueError(f"{where}: component {value!r} has positional arguments; give its options by name")
        keywords = value.keywords if isinstance(value, functools.partial) else {}
        return {"_target_": _target_of(func), **{k: _plain(v, f"{where}.{k}") for k, v in keywords.items()}}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ValueError(f"{where}: {type(value).__name__} value {value!r} cannot be written to {DESCRIPTION_NAME}")


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a file (the description records the weights' one).

    Example:
        >>> file_sha256("outputs/derm7pt_cmml/models/model.pt")  # doctest: +SKIP
        '3f1c...'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def described_method(desc: Mapping[str, Any]) -> str:
    """The method a description's network was trained as (``method`` in the config; ``"cmml"`` when unnamed).

    Example:
        >>> described_method(load_description("runs/derm/models"))  # doctest: +SKIP
        'zero_fill'
    """
    return str(desc["network"].get("method") or "cmml")


def described_image_encoder(desc: Mapping[str, Any]) -> str | None:
    """The image backbone's name (``image_encoder``) of a description's network, or None for a custom encoder.

    Example:
        >>> described_image_encoder(load_description("runs/derm/models"))  # doctest: +SKIP
        'efficientnet-lite0'
    """
    encoder = dict(desc["network"].get("args") or {}).get("encoder")
    return str(encoder["image_encoder"]) if isinstance(encoder, Mapping) and "image_encoder" in encoder else None


def completes_missing(network: torch.nn.Module | Mapping[str, Any]) -> bool:
    """Whether ``network`` fills in a missing modality's representation (CMML's CRTA, mean imputation)
    rather than leaving it out (zero fill, modality dropout): the predictions list such modalities as
    completed.

    Args:
        network: the eager network, or its description (:func:`load_description`): a TorchScript module
            does not keep its class, so it is asked through the description's method.

    Raises:
        DataError: a description whose network is not a class of ``cmml_monai.networks``.

    Example:
        >>> completes_missing(LateFusionNet(InputSpec(2, 3, 2, 5), mode="zero_fill"))  # doctest: +SKIP
        False
        >>> completes_missing(load_description("bundle/men_cmml/models"))  # doctest: +SKIP
        True
    """
    if isinstance(network, Mapping):
        section = network["network"]
        cls = _network_class(section.get("target"))
        return issubclass(cls, CMMLNet) or dict(section.get("args") or {}).get("mode") == "mean_impute"
    return isinstance(network, CMMLNet) or getattr(network, "mode", None) == "mean_impute"


def describe_network(
    network: torch.nn.Module,
    case_list: CaseList,
    schema: TableSchema | None,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | str | None = None,
    reader: str = "itk",
    series: str | Mapping[str, str | None] | None = None,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    dataset_options: Mapping[str, Any] | None = None,
    method: str | None = None,
) -> dict[str, Any]:
    """The description of a network of :mod:`cmml_monai.networks` (``network_def`` in ``configs/train.json``).

    Args:
        network: the trained network (it carries ``build_args``, the resolved constructor arguments).
        case_list: the training dataset: modalities, classes, table columns.
        schema: the table schema fitted on the train split (``None`` without a table); stored in full.
        spatial_size, pixdim, reader, series, mean, std: the preprocessing
            (:func:`cmml_monai.data.dataset.case_transforms`); ``mean``/``std`` apply to 2D images only.
        dataset_options: the adapter options of the training run, for reference.
        method: the method's name (``method`` in the config), for reference.

    Raises:
        ValueError: ``network`` is not a class of ``cmml_monai.networks`` or has no ``build_args``.

    Example:
        >>> desc = describe_network(net, case_list, schema, spatial_size=(224, 224), method="cmml")  # doctest: +SKIP
        >>> desc["network"]["target"], desc["network"]["method"]
        ('cmml_monai.networks.CMMLNet', 'cmml')
    """
    args = getattr(network, "build_args", None)
    target = _target_of(type(network))
    if not isinstance(args, Mapping):
        raise ValueError(
            f"{type(network).__name__} has no build_args: build it as a class of {_NETWORKS_PACKAGE} "
            "(network_def in configs/train.json) so that it can be described"
        )
    args = _without_dropped(args)
    images = case_list.image_modalities
    kind = images[0].kind if images else None
    is_2d = kind == "image2d"
    return {
        "format": _FORMAT,
        "version": DESCRIPTION_VERSION,
        "weights": WEIGHTS_NAME,
        "network": {"target": target, "method": method, "args": _plain(args, "network_def")},
        "data": _data_section(case_list, schema, dataset_options),
        "preprocessing": {
            "kind": kind,
            "spatial_size": [int(s) for s in spatial_size],
            "pixdim": _plain(resolve_pixdim(pixdim), "pixdim"),
            "mean": [float(m) for m in mean] if is_2d and mean is not None else None,
            "std": [float(s) for s in std] if is_2d and std is not None else None,
            "reader": str(reader),
            "series": _plain(series, "series"),
        },
        "inputs": {
            "image": [sum(int(m.channels) for m in images), *[int(s) for s in spatial_size]],
            "tabular": schema.num_features if schema is not None and case_list.has_table else None,
        },
    }


def _data_section(
    case_list: CaseList, schema: TableSchema | None, dataset_options: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The description's ``data``: the dataset's modalities, classes and table schema."""
    return {
        "dataset": case_list.name,
        "dataset_options": _plain(dict(dataset_options or {}), "dataset_options"),
        "modalities": [{"name": m.name, "kind": m.kind, "channels": int(m.channels)} for m in case_list.modalities],
        "class_names": [str(c) for c in case_list.class_names],
        "multi_label": bool(case_list.multi_label),
        "activation": "sigmoid" if case_list.multi_label else "softmax",
        "table_columns": [str(c) for c in case_list.table_columns],
        "table_schema": schema.to_json() if schema is not None and case_list.has_table else None,
    }


def save_description(
    output_dir: str,
    network: torch.nn.Module,
    case_list: CaseList,
    schema: TableSchema | None,
    spatial_size: Sequence[int],
    pixdim: Sequence[float] | str | None = None,
    reader: str = "itk",
    series: str | Mapping[str, str | None] | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    tracker: Any = None,
    method: str | None = None,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> str:
    """Write ``<output_dir>/models/network.json`` beside the published ``model.pt`` (train.json's ``run`` list
    calls it after ``publish_model``). The weights' SHA-256 is recorded, so a later load can tell whether
    ``model.pt`` is still the file that was described.

    Args:
        output_dir: the run's output folder.
        network, case_list, schema, spatial_size, pixdim, reader, series, dataset_options, method, mean, std: see
            :func:`describe_network` (``mean``/``std``: the 2D normalisation the run trained with, which the
            image encoder's weights expect: ``cmml_monai.networks.input_normalization``).
        tracker: an ``MLflowTracker``; the description is logged beside ``model.pt`` when it is enabled.

    Returns:
        the path written.

    Example:
        >>> save_description("runs/derm", net, case_list, schema, spatial_size=(224, 224))  # doctest: +SKIP
        'runs/derm/models/network.json'
    """
    desc = describe_network(
        network,
        case_list,
        schema,
        spatial_size,
        pixdim,
        reader,
        series,
        mean=mean,
        std=std,
        dataset_options=dataset_options,
        method=method,
    )
    model_dir = os.path.join(output_dir, "models")
    weights = os.path.join(model_dir, WEIGHTS_NAME)
    if os.path.isfile(weights):
        desc["weights_sha256"] = file_sha256(weights)
    path = os.path.join(model_dir, DESCRIPTION_NAME)
    atomic_write_json(path, desc, indent=2)
    logger.info("network description: %s", path)
    if tracker is not None and getattr(tracker, "enabled", False):
        tracker.log_artifact(path, "models")
    return path


def resolve_model_dir(model_dir: str) -> str:
    """The folder holding ``network.json``: ``model_dir`` itself, or its ``models/`` (a training output dir).

    Raises:
        DataError: neither holds a description; the message says how to write one.

    Example:
        >>> resolve_model_dir("outputs/derm7pt_cmml")  # doctest: +SKIP
        'outputs/derm7pt_cmml/models'
    """
    model_dir = os.fspath(model_dir)
    for folder in (model_dir, os.path.join(model_dir, "models")):
        if os.path.isfile(os.path.join(folder, DESCRIPTION_NAME)):
            return folder
    if not os.path.isdir(model_dir):
        raise DataError(f"model_dir {model_dir} does not exist; pass a training run's models/ folder")
    raise DataError(
        f"{model_dir} has no {DESCRIPTION_NAME} (the description needed to rebuild the network): the run was "
        "trained before descriptions were written; write it by adding configs/describe.json to the training "
        "command (same overlays and output_dir; needs the training data) or train again"
    )


def load_description(model_dir: str) -> dict[str, Any]:
    """Read and check ``network.json`` of ``model_dir`` (a ``models/`` folder or the run's output folder).

    Raises:
        DataError: the file is missing, unreadable or not a description of this version.

    Example:
        >>> load_description("outputs/derm7pt_cmml/models")["data"]["class_names"]  # doctest: +SKIP
        ['BCC', 'NEV', 'MEL', 'MISC', 'SK']
    """
    folder = resolve_model_dir(model_dir)
    path = os.path.join(folder, DESCRIPTION_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            desc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the network description ({e}); write it again") from e
    desc = check_description(desc, path)
    desc["model_dir"] = folder
    return desc


def check_description(desc: Any, source: str) -> dict[str, Any]:
    """``desc`` if it is a network description this package reads (format, version, sections).

    Args:
        desc: the parsed JSON.
        source: where it was read (named in errors): a ``network.json`` path, or a TorchScript file.

    Raises:
        DataError: not a description, another version, or a section missing.

    Example:
        >>> check_description(json.load(open("models/network.json")), "models/network.json")  # doctest: +SKIP
        {'format': ..., 'version': ..., 'network': {...}, ...}
    """
    if not isinstance(desc, dict) or desc.get("format") != _FORMAT:
        raise DataError(f"{source} is not a cmml-monai network description; write it again")
    if desc.get("version") != DESCRIPTION_VERSION:
        raise DataError(
            f"{source}: description version {desc.get('version')!r}, this package reads {DESCRIPTION_VERSION}; write "
            "it again: python -m monai.bundle run --config_file \"['configs/train.json','configs/describe.json']\" "
            "with the run's overrides"
        )
    for key in ("network", "data", "preprocessing"):
        if not isinstance(desc.get(key), dict):
            raise DataError(f"{source}: no {key!r} section; write the description again")
    return desc


def _target_of(cls: Callable[..., Any]) -> str:
    """``cmml_monai.networks.Name``, the path ``network_def`` names the class by."""
    package = importlib.import_module(_NETWORKS_PACKAGE)
    if getattr(package, cls.__name__, None) is not cls:
        raise ValueError(
            f"{cls.__module__}.{cls.__qualname__} is not a network of {_NETWORKS_PACKAGE}: cannot describe it"
        )
    return f"{_NETWORKS_PACKAGE}.{cls.__name__}"


def _network_class(target: Any, options: bool = False) -> type:
    """The class a description names; only networks (and, with ``options``, option dataclasses) of
    ``cmml_monai.networks``."""
    module, _, name = str(target).rpartition(".")
    cls = getattr(importlib.import_module(_NETWORKS_PACKAGE), name, None) if module == _NETWORKS_PACKAGE else None
    is_options = options and dataclasses.is_dataclass(cls)
    if not (isinstance(cls, type) and (issubclass(cls, torch.nn.Module) or is_options)):
        raise DataError(f"{DESCRIPTION_NAME}: network target {target!r} is not a network class of {_NETWORKS_PACKAGE}")
    return cls


def _without_dropped(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` without the ``_DROPPED_ARGS``, its own or its components' (a ``functools.partial``'s options)."""
    out = {k: v for k, v in args.items() if k not in _DROPPED_ARGS}
    for name, value in list(out.items()):
        if isinstance(value, functools.partial) and any(k in value.keywords for k in _DROPPED_ARGS):
            kept = {k: v for k, v in value.keywords.items() if k not in _DROPPED_ARGS}
            out[name] = functools.partial(value.func, *value.args, **kept) if kept or value.args else value.func
    return out


def _component(value: Any) -> Any:
    """A ``{"_target_": path, **options}`` argument as the network takes it: an options dataclass built, a
    component as the class or ``functools.partial`` the network calls."""
    if not (isinstance(value, Mapping) and "_target_" in value):
        return value
    options = {k: v for k, v in value.items() if k != "_target_"}
    cls = _network_class(value["_target_"], options=True)
    if dataclasses.is_dataclass(cls):
        return cls(**options)
    return functools.partial(cls, **options) if options else cls


def description_schema(desc: Mapping[str, Any]) -> TableSchema | None:
    """The table schema stored in a description (``None`` when the network has no table).

    Example:
        >>> description_schema(load_description("outputs/derm7pt_cmml/models")).num_features  # doctest: +SKIP
        3
    """
    data = desc["data"].get("table_schema")
    return None if data is None else TableSchema.from_json(data, source=DESCRIPTION_NAME)


def description_preprocessing(desc: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing a description records, as keyword arguments of
    :func:`~cmml_monai.data.dataset.case_transforms` and :func:`~cmml_monai.data.dataset.build_dataset`.

    Example:
        >>> description_preprocessing(load_description("outputs/derm7pt_cmml/models"))["spatial_size"]  # doctest: +SKIP
        [224, 224]
    """
    prep = desc["preprocessing"]
    return {
        "spatial_size": prep["spatial_size"],
        "pixdim": prep.get("pixdim"),
        "reader": prep.get("reader", "itk"),
        "series": prep.get("series"),
        "mean": prep.get("mean"),
        "std": prep.get("std"),
    }


def build_from_description(desc: Mapping[str, Any]) -> torch.nn.Module:
    """A fresh (untrained) network of the described architecture.

    Raises:
        DataError: the arguments do not build a network (e.g. written by another version of the package).

    Example:
        >>> build_from_description(load_description("outputs/derm7pt_cmml/models"))  # doctest: +SKIP
        CMMLNet(...)
    """
    cls = _network_class(desc["network"].get("target"))
    try:
        args = {k: _component(v) for k, v in desc["network"]["args"].items()}
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise DataError(f"{DESCRIPTION_NAME}: its network arguments do not build a network ({e})") from e


def _state_dict_of(obj: Any, path: str) -> Mapping[str, torch.Tensor]:
    # publish_model serves either a bare state dict (a copy of model_best.pt) or {"network": state}
    if isinstance(obj, Mapping) and isinstance(obj.get("network"), Mapping):
        obj = obj["network"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"{path} holds no network state dict; pass the models/model.pt of a training run")
    return obj


def _mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {list(found[k].shape)} vs {list(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if shapes:
        parts.append(f"{len(shapes)} shapes differ, checkpoint vs description (e.g. {'; '.join(shapes[:3])})")
    return parts


def load_network(model_dir: str, checkpoint: str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the served network from ``network.json`` alone and load its weights, in eval mode.

    Args:
        model_dir: a training run's ``models/`` folder (or the run's output folder).
        checkpoint: the weights (default ``<model_dir>/model.pt``).
        device: where the network goes.

    Raises:
        DataError: no description, no checkpoint, or a checkpoint that does not fit the description (the
            message names the tensors that differ).

    Example:
        >>> net = load_network("outputs/derm7pt_cmml/models")  # doctest: +SKIP
        >>> logits = net(image, tabular)
    """
    desc = load_description(model_dir)
    path = checkpoint or os.path.join(desc["model_dir"], desc.get("weights", WEIGHTS_NAME))
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} not found; pass --checkpoint or the models/ folder of a finished run")
    sha = desc.get("weights_sha256")
    if sha and file_sha256(path) != sha:
        # allowed (e.g. another epoch's weights of the same run); the key and shape check below still applies
        logger.warning("%s is not the file the description was written for; loading it anyway", path)
    network = build_from_description(desc)
    state = _state_dict_of(torch.load(path, map_location="cpu", weights_only=True), path)
    parts = _mismatch(network.state_dict(), state)
    if parts:
        raise DataError(
            f"checkpoint {path} does not fit {os.path.join(desc['model_dir'], DESCRIPTION_NAME)} "
            f"(method {desc['network'].get('method')!r}): {', '.join(parts)}; "
            "pass the model.pt of the run that wrote the description"
        )
    network.load_state_dict(state)
    return network.to(device).eval()
