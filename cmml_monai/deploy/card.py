"""The descriptive files of a packaged bundle: ``configs/metadata.json`` (:func:`bundle_metadata`, with MONAI's
``network_data_format``) and ``docs/README.md``, the model card (:func:`model_card`), both from the run's
network description and its missing-rate sweep. :func:`cmml_monai.deploy.package.package_bundle` writes them.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import monai
import numpy as np
import torch

import cmml_monai
from cmml_monai.deploy.description import described_image_encoder, described_method

__all__ = ["network_data_format", "bundle_metadata", "model_card", "PACKAGE_NAME", "DEFAULT_VERSION"]

PACKAGE_NAME = "cmml-monai"
DEFAULT_VERSION = "0.1.0"
_SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
_RGB = ("R", "G", "B")


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


def _image_format(data: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``network_data_format`` of the packed ``image`` input: one named channel per modality channel."""
    images = [m for m in data["modalities"] if m["kind"] != "table"]
    channel_def: dict[str, str] = {}
    for m in images:
        for c in range(int(m["channels"])):
            suffix = f" {_RGB[c]}" if int(m["channels"]) == 3 else (f" {c}" if int(m["channels"]) > 1 else "")
            channel_def[str(len(channel_def))] = f"{m['name']}{suffix}"
    kind = "2D image" if images and images[0]["kind"] == "image2d" else "3D volume"
    missing = "an all-NaN modality is missing"
    return {
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


def _pred_format(data: Mapping[str, Any]) -> dict[str, Any]:
    """``network_data_format`` of the ``pred`` output: one logit per class (or label)."""
    return {
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


def _tabular_format(data: Mapping[str, Any], features: int) -> dict[str, Any]:
    """``network_data_format`` of the ``tabular`` input: one channel per encoded table feature."""
    columns = [c["name"] for c in (data.get("table_schema") or {}).get("columns", [])]
    if len(columns) != features:
        columns = [f"feature {i}" for i in range(features)]
    return {
        "type": "tabular",
        "format": "encoded clinical features: numbers standardised, categories as codes, NaN = missing",
        "num_channels": features,
        "spatial_shape": [],
        "dtype": "float32",
        "value_range": [],
        "is_patch_data": False,
        "channel_def": {str(i): c for i, c in enumerate(columns)},
    }


def network_data_format(description: Mapping[str, Any]) -> dict[str, Any]:
    """MONAI's ``network_data_format`` of the described network: ``image`` (channels named per modality),
    ``tabular`` (one channel per table feature; absent without a table) and ``pred`` (logits per class).

    Example:
        >>> fmt = network_data_format(load_description("outputs/derm7pt_cmml/models"))  # doctest: +SKIP
        >>> fmt["outputs"]["pred"]["type"]
        'logits'
    """
    data, inputs = description["data"], description["inputs"]
    out: dict[str, Any] = {"inputs": {"image": _image_format(data, inputs)}, "outputs": {"pred": _pred_format(data)}}
    if inputs.get("tabular"):
        out["inputs"]["tabular"] = _tabular_format(data, int(inputs["tabular"]))
    return out


def _eval_metrics(run_dir: str) -> dict[str, Any]:
    """``eval_metrics`` of the metadata: the sweep's average AUC and rates, or why there is none."""
    _, _, summary = _sweep(run_dir)
    metrics: dict[str, Any] = {}
    if "avg_auc" in summary:
        metrics[f"avg_auc_{summary.get('split', 'test')}"] = float(summary["avg_auc"])
        metrics["missing_rates"] = list(summary.get("rates", []))
    else:
        metrics["macro_auc"] = "not measured: the run has no sweep/summary.json"
    return metrics


def _task_fields(data: Mapping[str, Any], method: str) -> dict[str, str]:
    """The metadata's ``name``, ``task`` and ``description``."""
    images = [m["name"] for m in data["modalities"] if m["kind"] != "table"]
    table = list(data.get("table_columns") or [])
    return {
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
    }


def _data_fields(data: Mapping[str, Any]) -> dict[str, str]:
    """The metadata's ``data_source``, ``data_type``, ``image_classes``, ``label_classes`` and ``pred_classes``."""
    images = [m["name"] for m in data["modalities"] if m["kind"] != "table"]
    table = list(data.get("table_columns") or [])
    classes = [str(c) for c in data["class_names"]]
    kind = "image2d" if any(m["kind"] == "image2d" for m in data["modalities"]) else "image3d"
    return {
        "data_source": f"{data['dataset']} (see docs/README.md)",
        "data_type": ("jpeg / png" if kind == "image2d" else "nifti / dicom") + (" plus csv / xlsx" if table else ""),
        "image_classes": f"{len(images)} modalities ({', '.join(images)}) packed along channels; an all-NaN "
        "modality is missing",
        "label_classes": f"{len(classes)} {'labels' if data['multi_label'] else 'classes'}: {', '.join(classes)}",
        "pred_classes": f"{len(classes)} logits: {', '.join(classes)}",
    }


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
    data = description["data"]
    method = described_method(description)
    entry = (
        f"packaged from run {os.path.basename(os.path.normpath(run_dir))}: method {method}, "
        f"dataset {data['dataset']}, {datetime.date.today().isoformat()}"
    )
    changelog = dict(changelog or {version: entry})
    if version not in changelog:
        raise ValueError(f"version {version!r} is not in the changelog {list(changelog)}; add an entry for it")
    metrics = _eval_metrics(run_dir)
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
        **_task_fields(data, method),
        "authors": str(base.get("authors", "cmml-monai developers")),
        "copyright": str(base.get("copyright", "Copyright (c) cmml-monai developers")),
        **_data_fields(data),
        "eval_metrics": metrics,
        "intended_use": str(base.get("intended_use", "Research only. Not for clinical diagnosis.")),
        "references": list(base.get("references", [])),
        "network_data_format": network_data_format(description),
    }


def _card_model_inputs_data(
    description: Mapping[str, Any], metadata: Mapping[str, Any], fingerprint: Mapping[str, Any]
) -> list[str]:
    """The card's title and its Model, Inputs and Data sections."""
    data, prep, args = description["data"], description["preprocessing"], description["network"]["args"]
    images = [m for m in data["modalities"] if m["kind"] != "table"]
    modalities = [f"{m['name']} ({m['kind']}, {m['channels']} channel(s))" for m in images]
    # file options (split files) are paths of the training machine: not part of a model card
    options = {k: v for k, v in (data.get("dataset_options") or {}).items() if not k.endswith("_file")}
    table = list(data.get("table_columns") or [])
    return [
        f"# {metadata['name']}",
        "",
        f"Version {metadata['version']}. {metadata['intended_use']}",
        "",
        "## Model",
        "",
        f"- Method: `{described_method(description)}`, image encoder `{described_image_encoder(description)}`, "
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
    ]


def _card_results(
    sweep: Sequence[Mapping[str, str]], subsets: Sequence[Mapping[str, str]], summary: Mapping[str, Any]
) -> list[str]:
    """The card's Results section: the sweep by missing rate and by fixed modality subset."""
    lines = ["## Results", ""]
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
    return lines


#: the card's Use section (the same for every bundle)
_CARD_USE = [
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
]


def _card_limitations(dataset: str, sweep: Sequence[Mapping[str, str]]) -> list[str]:
    """The card's Limitations section."""
    return [
        "## Limitations",
        "",
        "- Research use only; not validated for clinical decisions.",
        f"- Trained and evaluated on one dataset (`{dataset}`); performance on other sites, scanners or "
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
    ]


def model_card(description: Mapping[str, Any], metadata: Mapping[str, Any], run_dir: str) -> str:
    """``docs/README.md`` of the bundle: what the model is, its inputs, the data, the results by missing rate
    and by modality subset (with ECE as calibration) from the run's sweep, how to run it, limitations.

    Example:
        >>> text = model_card(desc, bundle_metadata(desc, "runs/derm"), "runs/derm")  # doctest: +SKIP
    """
    sweep, subsets, summary = _sweep(run_dir)
    fingerprint = _read_json(os.path.join(run_dir, "dataset_fingerprint.json"))
    lines = [
        *_card_model_inputs_data(description, metadata, fingerprint),
        *_card_results(sweep, subsets, summary),
        *_CARD_USE,
        *_card_limitations(description["data"]["dataset"], sweep),
        "## Changelog",
        "",
        *[f"- {v}: {text}" for v, text in metadata.get("changelog", {}).items()],
        "",
    ]
    return "\n".join(lines)
