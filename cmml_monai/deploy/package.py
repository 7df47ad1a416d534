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

import csv
import datetime
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import monai
import numpy as np
import torch

import cmml_monai
from cmml_monai.data.errors import DataError
from cmml_monai.data.jsonio import atomic_write_json
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

PACKAGE_NAME = "cmml-monai"
DEFAULT_VERSION = "0.1.0"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
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
_RGB = ("R", "G", "B")


def _project_file(*parts: str) -> str:
    path = os.path.join(_ROOT, *parts)
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: package_bundle reads the project's configs; run it from a checkout")
    return path


def network_data_format(description: Mapping[str, Any]) -> dict[str, Any]:
    """MONAI's ``network_data_format`` of the described network: ``image`` (channels named per modality),
    ``tabular`` (one channel per table feature; absent without a table) and ``pred`` (logits per class).

    Example:
        >>> fmt = network_data_format(load_description("outputs/derm7pt_cmml/models"))  # doctest: +SKIP
        >>> fmt["outputs"]["pred"]["type"]
        'logits'
    """
    data, inputs = description["data"], description["inputs"]
    images = [m for m in data["modalities"] if m["kind"] != "table"]
    channel_def: dict[str, str] = {}
    for m in images:
        for c in range(int(m["channels"])):
            suffix = f" {_RGB[c]}" if int(m["channels"]) == 3 else (f" {c}" if int(m["channels"]) > 1 else "")
            channel_def[str(len(channel_def))] = f"{m['name']}{suffix}"
    kind = "2D image" if images and images[0]["kind"] == "image2d" else "3D volume"
    missing = "an all-NaN modality is missing"
    out: dict[str, Any] = {
        "inputs": {
            "image": {
                "type": "image",
                "format": f"magnitude; {missing}",
                "modality": f"{', '.join(m['name'] for m in images)} ({kind} per modality, packed along channels)",
                "num_channels": int(inputs["image"][0]),
                "spatial_shape": [int(s) for s in inputs["image"][1:]],
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": False,
                "channel_def": channel_def,
            }
        },
        "outputs": {
            "pred": {
                "type": "logits",
                "format": (
                    "unnormalised scores, one per label; a sigmoid per label gives the probabilities"
                    if data["multi_label"]
                    else "unnormalised scores, one per class; softmax gives the class probabilities"
                )
                + "; inference.json writes the probabilities",
                "num_channels": len(data["class_names"]),
                "spatial_shape": [1],
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": False,
                "channel_def": {str(i): str(c) for i, c in enumerate(data["class_names"])},
            }
        },
    }
    schema = data.get("table_schema")
    if inputs.get("tabular"):
        columns = [c["name"] for c in (schema or {}).get("columns", [])]
        if len(columns) != int(inputs["tabular"]):
            columns = [f"feature {i}" for i in range(int(inputs["tabular"]))]
        out["inputs"]["tabular"] = {
            "type": "tabular",
            "format": "encoded clinical features: numbers standardised, categories as codes, NaN = missing",
            "num_channels": int(inputs["tabular"]),
            "spatial_shape": [],
            "dtype": "float32",
            "value_range": [],
            "is_patch_data": False,
            "channel_def": {str(i): c for i, c in enumerate(columns)},
        }
    return out


def _read_csv(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _sweep(run_dir: str) -> tuple[list[dict[str, str]], list[dict[str, str]], dict[str, Any]]:
    folder = os.path.join(run_dir, "sweep")
    return (
        _read_csv(os.path.join(folder, "sweep.csv")),
        _read_csv(os.path.join(folder, "subsets.csv")),
        _read_json(os.path.join(folder, "summary.json")),
    )


def bundle_metadata(
    description: Mapping[str, Any],
    run_dir: str,
    version: str = DEFAULT_VERSION,
    changelog: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``configs/metadata.json`` of the packaged run.

    Args:
        description: the run's network description.
        run_dir: the run's output folder (its ``sweep/summary.json`` gives ``eval_metrics`` when present).
        version: the bundle version; it must be a key of the changelog.
        changelog: version -> what changed (default: one entry saying what was packaged).
        base: the project's metadata (authors, copyright, references, package versions).

    Raises:
        ValueError: ``version`` is not in ``changelog``.

    Example:
        >>> meta = bundle_metadata(load_description("runs/derm/models"), "runs/derm", "1.0.0")  # doctest: +SKIP
    """
    base = dict(base or {})
    data, args = description["data"], description["network"]["args"]
    method = str(args.get("method", "cmml"))
    entry = (
        f"packaged from run {os.path.basename(os.path.normpath(run_dir))}: method {method}, "
        f"dataset {data['dataset']}, {datetime.date.today().isoformat()}"
    )
    changelog = dict(changelog or {version: entry})
    if version not in changelog:
        raise ValueError(f"version {version!r} is not in the changelog {list(changelog)}; add an entry for it")
    _, _, summary = _sweep(run_dir)
    metrics: dict[str, Any] = {}
    if "avg_auc" in summary:
        metrics[f"avg_auc_{summary.get('split', 'test')}"] = float(summary["avg_auc"])
        metrics["missing_rates"] = list(summary.get("rates", []))
    else:
        metrics["macro_auc"] = "not measured: the run has no sweep/summary.json"
    images = [m["name"] for m in data["modalities"] if m["kind"] != "table"]
    table = list(data.get("table_columns") or [])
    classes = [str(c) for c in data["class_names"]]
    kind = "image2d" if any(m["kind"] == "image2d" for m in data["modalities"]) else "image3d"
    packages = dict(base.get("required_packages_version") or {})
    packages[PACKAGE_NAME] = cmml_monai.__version__
    return {
        "schema": base.get("schema", _SCHEMA_URL),
        "version": str(version),
        "changelog": changelog,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": packages,
        "supported_apps": {},
        "name": f"CMML {data['dataset']} ({method})",
        "task": f"{'Multi-label' if data['multi_label'] else 'Single-label'} diagnosis from "
        f"{' + '.join(images)}{' + clinical table' if table else ''} with missing modalities",
        "description": (
            f"{method} network trained on the {data['dataset']} dataset: an encoder per modality "
            f"({', '.join(images + (['table'] if table else []))}); a missing modality is given as NaN "
            "and the network predicts from the others. The network returns logits; "
            "configs/inference.json writes probabilities (softmax, or a sigmoid per label) and the "
            "prediction per case. models/network.json rebuilds the network without the training data."
        ),
        "authors": str(base.get("authors", "cmml-monai developers")),
        "copyright": str(base.get("copyright", "Copyright (c) cmml-monai developers")),
        "data_source": f"{data['dataset']} (see docs/README.md)",
        "data_type": ("jpeg / png" if kind == "image2d" else "nifti / dicom") + (" plus csv / xlsx" if table else ""),
        "image_classes": f"{len(images)} modalities ({', '.join(images)}) packed along channels; an all-NaN "
        "modality is missing",
        "label_classes": f"{len(classes)} {'labels' if data['multi_label'] else 'classes'}: {', '.join(classes)}",
        "pred_classes": f"{len(classes)} logits: {', '.join(classes)}",
        "eval_metrics": metrics,
        "intended_use": str(base.get("intended_use", "Research only. Not for clinical diagnosis.")),
        "references": list(base.get("references", [])),
        "network_data_format": network_data_format(description),
    }


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


def _table(rows: Sequence[Mapping[str, str]], first: str, columns: Sequence[str]) -> list[str]:
    header = [first, *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r.get(first, ""))]
        for c in columns:
            try:
                cells.append(f"{float(r[c]):.3f}" if c != "n" else str(int(float(r[c]))))
            except (KeyError, TypeError, ValueError):
                cells.append(str(r.get(c, "")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def model_card(description: Mapping[str, Any], metadata: Mapping[str, Any], run_dir: str) -> str:
    """``docs/README.md`` of the bundle: what the model is, its inputs, the data, the results by missing rate
    and by modality subset (with ECE as calibration) from the run's sweep, how to run it, limitations.

    Example:
        >>> text = model_card(desc, bundle_metadata(desc, "runs/derm"), "runs/derm")  # doctest: +SKIP
    """
    data, prep, args = description["data"], description["preprocessing"], description["network"]["args"]
    sweep, subsets, summary = _sweep(run_dir)
    fingerprint = _read_json(os.path.join(run_dir, "dataset_fingerprint.json"))
    images = [m for m in data["modalities"] if m["kind"] != "table"]
    modalities = [f"{m['name']} ({m['kind']}, {m['channels']} channel(s))" for m in images]
    # file options (split files) are paths of the training machine: not part of a model card
    options = {k: v for k, v in (data.get("dataset_options") or {}).items() if not k.endswith("_file")}
    table = list(data.get("table_columns") or [])
    lines = [
        f"# {metadata['name']}",
        "",
        f"Version {metadata['version']}. {metadata['intended_use']}",
        "",
        "## Model",
        "",
        f"- Method: `{args.get('method')}`, image encoder `{args.get('image_encoder')}`, "
        f"feature dimension {args.get('feature_dim')}.",
        f"- Output: {metadata['network_data_format']['outputs']['pred']['format']}.",
        f"- {'Labels' if data['multi_label'] else 'Classes'}: {', '.join(map(str, data['class_names']))}.",
        "",
        "## Inputs",
        "",
        f"- Image modalities: {', '.join(modalities)};"
        f" resized to {prep['spatial_size']}"
        + (f", resampled to {prep['pixdim']} mm" if prep.get("pixdim") else "")
        + ".",
        f"- Clinical table: {', '.join(table) if table else 'none'}.",
        "- Any modality may be missing (an empty cell or an absent file); a case needs at least one.",
        "",
        "## Data",
        "",
        f"- Dataset: `{data['dataset']}`"
        + (f", {fingerprint['cases']} usable cases" if "cases" in fingerprint else "")
        + f"; adapter options: `{json.dumps(options)}`.",
        "",
        "## Results",
        "",
    ]
    if sweep:
        split = summary.get("split", "test")
        lines += [
            f"Macro AUC, accuracy, F1 and expected calibration error (ECE) on the {split} split with "
            "modalities dropped at random at each rate (seeded masks):",
            "",
            *_table(sweep, "rate", ["auc", "acc", "f1", "ece", "n"]),
            "",
        ]
        if "avg_auc" in summary:
            lines += [f"Average AUC over the rates: {float(summary['avg_auc']):.3f}.", ""]
    else:
        lines += ["The run has no missing-rate sweep (`sweep/sweep.csv`): not measured.", ""]
    if subsets:
        lines += [
            "By fixed modality subset (only these modalities present):",
            "",
            *_table(subsets, "subset", ["auc", "acc", "f1", "ece", "n"]),
            "",
        ]
    lines += [
        "## Use",
        "",
        "```bash",
        "# needs the cmml_monai package (pip install -e <checkout>) at the version in configs/metadata.json",
        "python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE \\",
        "    --dataset_dir /data/new_cases   # writes ./predictions/predictions.csv and one JSON per case",
        "```",
        "",
        "Score labelled cases (predictions plus `./evaluation/metrics.json`: AUC, accuracy, F1, ECE overall and "
        "per pattern of present modalities): add `BUNDLE/configs/evaluate.json` to `--config_file`.",
        "",
        "Add `--explain true` for one picture per case (`./predictions/cases/<case_id>.png` and `index.html`): the "
        "inputs with a Grad-CAM map each, the table given, the probabilities and the inputs the model completed.",
        "",
        "`models/model.ts` is TorchScript with both inputs: `torch.jit.load(path)(image, tabular)` returns logits.",
        "",
        "## Limitations",
        "",
        "- Research use only; not validated for clinical decisions.",
        f"- Trained and evaluated on one dataset (`{data['dataset']}`); performance on other sites, scanners or "
        "populations is unknown.",
        "- The table schema (categories, means) is the training one: an unseen category is encoded as missing.",
        "- Metrics come from the run's own test split"
        + (f" of {sweep[0].get('n', '?')} cases" if sweep else "")
        + "; small test sets give wide confidence intervals.",
        "- The outputs are logits; probabilities are not recalibrated (see ECE above).",
        "- The case pages' maps (Grad-CAM, `--explain true`) show which parts of each image moved the predicted "
        "class's score in this network, coarsely (one cell of the encoder's last stage spans many pixels) and "
        "relative within each image; they do not show where a lesion is, that the prediction is right, or anything "
        "about an input the model completed (it has no map).",
        "",
        "## Changelog",
        "",
        *[f"- {v}: {text}" for v, text in metadata.get("changelog", {}).items()],
        "",
    ]
    return "\n".join(lines)


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
        for sub in ("configs", "models", "docs"):
            os.makedirs(os.path.join(tmp, sub))
        models = os.path.join(tmp, "models")
        # a plain state dict: what ckpt_export and load_network both read without a key
        weights = os.path.join(models, WEIGHTS_NAME)
        torch.save(network.state_dict(), weights)
        desc = {k: v for k, v in description.items() if k != "model_dir"}
        desc["weights_sha256"] = file_sha256(weights)
        atomic_write_json(os.path.join(models, DESCRIPTION_NAME), desc, indent=2)
        export_torchscript(models, out=os.path.join(models, TORCHSCRIPT_NAME))
        metadata = bundle_metadata(description, run_dir, version, changelog, base_meta)
        atomic_write_json(os.path.join(tmp, "configs", "metadata.json"), metadata, indent=4)
        atomic_write_json(os.path.join(tmp, "configs", "inference.json"), inference, indent=4)
        atomic_write_json(os.path.join(tmp, "configs", "evaluate.json"), packaged_evaluate_config(), indent=4)
        shutil.copy(_project_file("configs", "logging.conf"), os.path.join(tmp, "configs", "logging.conf"))
        shutil.copy(license_file or _project_file("LICENSE"), os.path.join(tmp, "LICENSE"))
        with open(os.path.join(tmp, "docs", "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(description, metadata, run_dir))
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_zip:
        # written beside and renamed: a reader never sees a partial zip
        base = shutil.make_archive(
            out + ".partial", "zip", root_dir=os.path.dirname(out), base_dir=os.path.basename(out)
        )
        os.replace(base, out + ".zip")
    logger.info("bundle: %s%s", out, " (+ .zip)" if make_zip else "")
    return out
