"""A self-contained, model-zoo-style bundle from a trained run: what ``scripts/package_bundle.py`` writes.

Layout (the MONAI bundle specification)::

    NAME/
      configs/metadata.json    network_data_format from the run (channels, spatial shape, table columns,
                               classes; ``pred`` is logits), version and changelog
      configs/inference.json   the project's inference.json, pointed at the bundle's own models/ and
                               given the inference-workflow properties (network_def, inferer, dataset,
                               evaluator) that model-zoo checks, and the preprocessing and
                               postprocessing MONAI Label's BundleInferTask uses (cmml_monai.deploy.label)
      configs/evaluate.json    an overlay on inference.json: labelled cases, predictions plus
                               metrics.json (AUC, accuracy, F1, ECE overall and per present-modality pattern)
      configs/logging.conf
      models/model.pt          the weights (a plain state dict, as ``monai.bundle ckpt_export`` loads it)
      models/network.json      the description that rebuilds the network without the training data
      models/model.ts          TorchScript with both inputs, checked against eager on every missing pattern
      docs/README.md           a model card generated from the run
      LICENSE

Run it from any working directory by naming the bundle root (model-zoo's convention)::

    python -m monai.bundle run --config_file NAME/configs/inference.json --bundle_root NAME \\
        --dataset_dir /data/new_cases.csv

and score labelled cases with::

    python -m monai.bundle run --config_file "['NAME/configs/inference.json','NAME/configs/evaluate.json']" \\
        --bundle_root NAME --dataset_dir /data/labelled --split test

The bundle needs the ``cmml_monai`` package (its version is in ``required_packages_version``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from cmml_monai.data.errors import DataError
from cmml_monai.data.jsonio import atomic_write_json
from cmml_monai.deploy.card import DEFAULT_VERSION, PACKAGE_NAME, bundle_metadata, model_card, network_data_format
from cmml_monai.deploy.description import (
    DESCRIPTION_NAME,
    WEIGHTS_NAME,
    file_sha256,
    load_description,
    load_network,
)
from cmml_monai.deploy.export import TORCHSCRIPT_NAME, export_torchscript

__all__ = [
    "package_bundle",
    "bundle_metadata",
    "network_data_format",
    "packaged_inference_config",
    "packaged_evaluate_config",
    "model_card",
    "PACKAGE_NAME",
    "DEFAULT_VERSION",
]

logger = logging.getLogger(__name__)

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the keys of configs/inference.json the packaged config rewires; packaging fails loudly when one is gone
_INFERENCE_KEYS = (
    "bundle_root",
    "model_dir",
    "description",
    "dataset",
    "dataset_dir",
    "dataset_options",
    "case_list",
    "dataset_items",
    "predictor",
    "run",
    "output_dir",
    "network",
)


def _project_file(*parts: str) -> str:
    path = os.path.join(_ROOT, *parts)
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: package_bundle reads the project's configs; run it from a checkout")
    return path


def packaged_inference_config(base: Mapping[str, Any]) -> dict[str, Any]:
    """The project's ``configs/inference.json`` made to run from a packaged bundle: the model comes from
    ``<bundle_root>/models``, predictions go to ``./predictions`` of the working directory, and the
    inference-workflow properties model-zoo checks exist (``network_def``: the described network, untrained,
    for ``ckpt_export`` and ``verify_net_in_out``; ``inferer``; ``dataset``: the items; ``evaluator``: the
    predictor). The adapter name moves from ``dataset`` to ``dataset_name``. ``preprocessing`` and
    ``postprocessing`` serve MONAI Label (one image per request, :mod:`cmml_monai.deploy.label`).

    Raises:
        ValueError: ``base`` lacks a key this rewiring relies on (the project's inference.json changed).

    Example:
        >>> cfg = packaged_inference_config(json.load(open("configs/inference.json")))  # doctest: +SKIP
        >>> cfg["model_dir"]
        "$os.path.join(@bundle_root, 'models')"
    """
    missing = [k for k in _INFERENCE_KEYS if k not in base]
    if missing:
        raise ValueError(f"configs/inference.json has no {missing}; update cmml_monai.deploy.package to match it")
    cfg = json.loads(json.dumps(base))  # a deep copy of plain JSON
    items = cfg.pop("dataset_items")
    cfg.update(
        {
            "bundle_root": ".",
            "model_dir": "$os.path.join(@bundle_root, 'models')",
            "dataset_name": "$@description['data']['dataset']",
            "dataset_dir": "$os.path.join(@bundle_root, 'data')",
            "output_dir": "$os.path.abspath('predictions')",
            "case_list": (
                "$cmml_monai.deploy.inference_cases(@description, @dataset_name, @dataset_dir, @dataset_options)"
            ),
            "network_def": "$cmml_monai.deploy.build_from_description(@description)",
            "inferer": {"_target_": "SimpleInferer"},
            # MONAI Label's BundleInferTask (classification): one image per request -> packed input -> probabilities
            "preprocessing": {
                "_target_": "Compose",
                "transforms": [{"_target_": "cmml_monai.deploy.label.LabelRequestd", "description": "@description"}],
            },
            "postprocessing": {
                "_target_": "cmml_monai.deploy.label.label_postprocessing",
                "description": "@description",
            },
            "dataset": items,
            "evaluator": "@predictor",
            "run": ["$@evaluator.run()"],
        }
    )
    cfg["predictor"] = {**cfg["predictor"], "dataset": "@dataset", "inferer": "@inferer"}
    return cfg


def packaged_evaluate_config() -> dict[str, Any]:
    """``configs/evaluate.json`` of a bundle: an overlay on its ``inference.json`` that reads the cases with their
    labels, predicts them into ``./evaluation`` and scores the predictions
    (:func:`cmml_monai.deploy.score_predictions`: ``metrics.json``).

    Example:
        >>> packaged_evaluate_config()["dataset_options#labels"]
        True
    """
    return {
        "dataset_options#labels": True,
        "output_dir": "$os.path.abspath('evaluation')",
        "run": ["$@evaluator.run()", "$cmml_monai.deploy.score_predictions(@output_dir, @case_list, @description)"],
    }


def _write_models(root: str, network: torch.nn.Module, description: Mapping[str, Any]) -> None:
    """``models/``: the weights as a plain state dict, the description with their hash, TorchScript."""
    models = os.path.join(root, "models")
    os.makedirs(models)
    # a plain state dict: what ckpt_export and load_network both read without a key
    weights = os.path.join(models, WEIGHTS_NAME)
    torch.save(network.state_dict(), weights)
    desc = {k: v for k, v in description.items() if k != "model_dir"}
    desc["weights_sha256"] = file_sha256(weights)
    atomic_write_json(os.path.join(models, DESCRIPTION_NAME), desc, indent=2)
    export_torchscript(models, out=os.path.join(models, TORCHSCRIPT_NAME))


def _write_configs(root: str, metadata: Mapping[str, Any], inference: Mapping[str, Any]) -> None:
    """``configs/``: metadata, the packaged inference and evaluate configs and logging.conf."""
    configs = os.path.join(root, "configs")
    os.makedirs(configs)
    atomic_write_json(os.path.join(configs, "metadata.json"), metadata, indent=4)
    atomic_write_json(os.path.join(configs, "inference.json"), inference, indent=4)
    atomic_write_json(os.path.join(configs, "evaluate.json"), packaged_evaluate_config(), indent=4)
    shutil.copy(_project_file("configs", "logging.conf"), os.path.join(configs, "logging.conf"))


def _zip(out: str) -> None:
    """``<out>.zip`` with the bundle folder inside, written beside and renamed: a reader never sees a partial zip."""
    base = shutil.make_archive(out + ".partial", "zip", root_dir=os.path.dirname(out), base_dir=os.path.basename(out))
    os.replace(base, out + ".zip")


def package_bundle(
    run_dir: str,
    out: str,
    version: str = DEFAULT_VERSION,
    changelog: Mapping[str, str] | None = None,
    license_file: str | None = None,
    make_zip: bool = False,
    overwrite: bool = False,
) -> str:
    """Write a self-contained bundle of the trained run ``run_dir`` to the folder ``out`` (see the module
    docstring). The bundle is built in a temporary sibling folder and renamed at the end, so ``out`` is never
    half-written.

    Args:
        run_dir: the run's output folder (``models/model.pt`` + ``models/network.json``; ``sweep/`` is used
            when present).
        out: the bundle folder, e.g. ``bundle/derm7pt_cmml``; its name is the bundle name.
        version: the bundle version (in metadata and the changelog).
        changelog: version -> text (default: one entry for ``version``).
        license_file: the LICENSE to include (default the project's).
        make_zip: also write ``<out>.zip`` (the bundle folder inside, as model-zoo distributes them).
        overwrite: replace an existing ``out`` (and zip).

    Returns:
        the bundle folder.

    Raises:
        DataError: no trained model or description in ``run_dir``; ``out`` exists without ``overwrite``.

    Example:
        >>> package_bundle("outputs/derm7pt_cmml", "bundle/derm7pt_cmml", make_zip=True)  # doctest: +SKIP
        'bundle/derm7pt_cmml'
    """
    run_dir, out = os.fspath(run_dir), os.path.abspath(os.fspath(out))
    description = load_description(run_dir)  # DataError when the run has no description
    network = load_network(run_dir, device="cpu")  # DataError when the weights do not fit it
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise DataError(f"{out} already exists; choose another --out or pass --overwrite")
    with open(_project_file("configs", "metadata.json"), encoding="utf-8") as f:
        base_meta = json.load(f)
    with open(_project_file("configs", "inference.json"), encoding="utf-8") as f:
        inference = packaged_inference_config(json.load(f))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}-", dir=os.path.dirname(out))
    try:
        _write_models(tmp, network, description)
        metadata = bundle_metadata(description, run_dir, version, changelog, base_meta)
        _write_configs(tmp, metadata, inference)
        shutil.copy(license_file or _project_file("LICENSE"), os.path.join(tmp, "LICENSE"))
        os.makedirs(os.path.join(tmp, "docs"))
        with open(os.path.join(tmp, "docs", "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(description, metadata, run_dir))
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_zip:
        _zip(out)
    logger.info("bundle: %s%s", out, " (+ .zip)" if make_zip else "")
    return out
