"""Predictions for new cases from a published model: what ``configs/inference.json`` runs.

The network and the preprocessing come from the run's ``models/network.json`` (never from the training
data); the cases from a dataset folder in its native layout (the Derm7pt / ODIR-5K / MEN adapters), with
any subset of modalities per case, image-only and table-only included. Labels are not used.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import Dataset
from torch.utils.data import ConcatDataset
from tqdm import tqdm

from cmml_monai.data.adapters import load_dataset
from cmml_monai.data.adapters.manifest import MANIFEST_INPUT_OPTIONS, MANIFEST_NAME
from cmml_monai.data.cases import CaseList
from cmml_monai.data.dataset import build_dataloader, build_dataset
from cmml_monai.data.errors import DataError
from cmml_monai.data.jsonio import atomic_write_json
from cmml_monai.data.preflight import run_preflight
from cmml_monai.data.table import TableSchema, is_empty_cell, normalise_category
from cmml_monai.deploy.description import completes_missing, description_preprocessing, description_schema
from cmml_monai.evaluation.casepage import save_page, write_index
from cmml_monai.evaluation.explain import Explainer
from cmml_monai.metrics import classification_metrics

__all__ = [
    "inference_cases",
    "check_cases",
    "unseen_categories",
    "manifest_defaults",
    "score_predictions",
    "METRICS_NAME",
    "inference_dataset",
    "probabilities",
    "Predictor",
    "PREDICTIONS_NAME",
    "PAGES_INDEX_NAME",
    "case_explainer",
]

logger = logging.getLogger(__name__)

PREDICTIONS_NAME = "predictions.csv"
#: the run's list of case pages (``cases/index.html``), written with ``explain``
PAGES_INDEX_NAME = "index.html"
METRICS_NAME = "metrics.json"
#: a multi-label prediction lists the labels whose probability reaches this
MULTI_LABEL_THRESHOLD = 0.5


def check_cases(description: Mapping[str, Any], case_list: CaseList) -> None:
    """Raise when ``case_list`` does not give the inputs the described network was trained on.

    Raises:
        DataError: other modalities (names, kinds, channels, order) or table columns, both named.

    Example:
        >>> check_cases(load_description("outputs/derm7pt_cmml/models"), case_list)  # doctest: +SKIP
    """
    want = [(m["name"], m["kind"], int(m["channels"])) for m in description["data"]["modalities"]]
    got = [(m.name, m.kind, int(m.channels)) for m in case_list.modalities]
    if want != got:
        raise DataError(
            f"dataset {case_list.name!r} gives modalities {got}, the model was trained on {want}; "
            "use the dataset (and dataset_options) the model was trained with"
        )
    want_cols = list(description["data"].get("table_columns") or [])
    if want_cols != list(case_list.table_columns):
        raise DataError(
            f"dataset {case_list.name!r} gives table columns {list(case_list.table_columns)}, the model was trained "
            f"on {want_cols}; set dataset_options (e.g. table_columns) as in training"
        )


def manifest_defaults(description: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest adapter options that give the described network its inputs: the training run's column
    roles (``MANIFEST_INPUT_OPTIONS`` it was given) and otherwise the trained modality names as image columns
    and the trained table columns, so a new-case manifest needs only the same column names.

    Example:
        >>> manifest_defaults(load_description("outputs/manifest_cmml/models"))  # doctest: +SKIP
        {'image_columns': ['t1c', 't2w'], 'table_columns': ['age', 'sex'], 'image_kind': 'image3d'}
    """
    data = description["data"]
    trained = data.get("dataset_options") or {}
    out = {k: trained[k] for k in MANIFEST_INPUT_OPTIONS if trained.get(k) is not None}
    images = [m for m in data["modalities"] if m["kind"] != "table"]
    out.setdefault("image_columns", [m["name"] for m in images])
    out.setdefault("table_columns", list(data.get("table_columns") or []))
    if images:
        out.setdefault("image_kind", images[0]["kind"])
    if not data["multi_label"]:
        # labelled new cases (evaluation) keep the trained class order, whichever classes they hold
        out.setdefault("class_names", list(data["class_names"]))
    return out


def unseen_categories(schema: TableSchema | None, case_list: CaseList) -> dict[str, list[str]]:
    """Per categorical column, the values of ``case_list`` that the schema did not see in training (they are
    encoded as missing).

    Example:
        >>> unseen_categories(description_schema(desc), cases)  # doctest: +SKIP
        {'sex': ['other']}
    """
    out: dict[str, list[str]] = {}
    for col in schema.columns if schema is not None else []:
        if col.type != "categorical":
            continue
        values = {
            normalise_category(c.table.get(col.name))
            for c in case_list.cases
            if not is_empty_cell(c.table.get(col.name))
        }
        new = sorted(values - set(col.vocabulary))
        if new:
            out[col.name] = new
    return out


def inference_cases(
    description: Mapping[str, Any],
    dataset: str,
    dataset_dir: str,
    options: Mapping[str, Any] | None = None,
) -> CaseList:
    """The cases of ``dataset_dir`` (native layout of ``dataset``, or a manifest), checked against the description.

    Unlike training (``cmml_monai.data.load_cases``) no label and no split is needed: the adapter reads the
    cases with ``labels=False`` (label columns and split files may be absent; Derm7pt index files and a MEN
    split column that are there still name each case's split, for ``split``). Cases whose every modality is
    missing cannot be predicted; the adapter drops them and their number is logged.

    Example:
        >>> desc = load_description("outputs/derm7pt_cmml/models")  # doctest: +SKIP
        >>> cases = inference_cases(desc, "derm7pt", "/data/new/release_v0")
    """
    # labels are not needed: the label columns and split files may be absent (dataset_options may say otherwise)
    defaults: dict[str, Any] = {"labels": False}
    if str(dataset).strip().lower() == MANIFEST_NAME:
        defaults.update(manifest_defaults(description))  # the trained column roles, not re-inferred ones
    case_list = load_dataset(dataset, dataset_dir, **{**defaults, **dict(options or {})})
    check_cases(description, case_list)
    for column, values in unseen_categories(description_schema(description), case_list).items():
        logger.warning(
            "table column %r: %s not seen in training; encoded as missing", column, ", ".join(map(repr, values))
        )
        for value in values:
            # said once, here, for the whole list: not again by TableSchema.encode for each item that has it
            warnings.filterwarnings(
                "ignore", message=re.escape(f"table column {column!r}: category {value!r} was not seen in training")
            )
    empty = sum(1 for _, reason in case_list.dropped if reason == "every modality missing")
    if empty:
        logger.warning("%d case(s) have no modality at all and get no prediction", empty)
    if not case_list.cases:
        raise DataError(f"no case with at least one modality in {dataset_dir}; nothing to predict")
    return case_list


def inference_dataset(
    description: Mapping[str, Any],
    case_list: CaseList,
    split: str | Sequence[str] | None = None,
    preflight: str = "off",
    num_workers: int = 0,
    output_dir: str | None = None,
    progress: bool = False,
) -> Dataset:
    """The cases as batch-contract items (no label), preprocessed as the description says.

    Args:
        description: from :func:`cmml_monai.deploy.load_description`.
        case_list: from :func:`inference_cases`.
        split: only the cases of these splits (``None``: every case).
        preflight: :func:`cmml_monai.data.preflight.run_preflight` before any prediction: ``"fail"`` (every
            unusable file listed at once, nothing predicted), ``"mark_missing"`` (an unusable image modality
            becomes missing: the case is predicted from the others and ``present`` shows it) or ``"off"``
            (a bad file stops the run when it is read). The check decodes every file once more.
        num_workers: preflight threads.
        output_dir: where ``preflight.json`` goes when there are problems.
        progress: preflight progress bar.

    Example:
        >>> inference_dataset(desc, cases)[0]["image"].shape  # doctest: +SKIP
        torch.Size([6, 224, 224])
    """
    preprocessing = description_preprocessing(description)
    schema = description_schema(description)
    wanted = None if split is None else ({split} if isinstance(split, str) else set(split))
    # one dataset per split: the preflight matches its problems to cases by (split, case id)
    splits = list(dict.fromkeys(c.split for c in case_list.cases if wanted is None or c.split in wanted))
    if wanted is not None and not splits:
        raise DataError(
            f"no case in split(s) {sorted(wanted)}; the cases' splits are "
            f"{sorted({c.split for c in case_list.cases})} (omit split for every case)"
        )
    datasets = {
        s: build_dataset(
            case_list,
            s,
            schema,
            **preprocessing,
            with_label=False,
        )
        for s in splits
    }
    run_preflight(case_list, datasets, preflight, max(1, int(num_workers)), output_dir, progress)
    parts = list(datasets.values())
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Softmax over classes (single-label) or a sigmoid per label (multi-label) of ``[B, K]`` logits.

    Example:
        >>> probabilities(torch.zeros(1, 4), multi_label=False)
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)


def case_explainer(network: torch.nn.Module, description: Mapping[str, Any], method: str = "auto") -> Explainer:
    """The :class:`~cmml_monai.evaluation.explain.Explainer` of a served network (eager: Grad-CAM on a copy;
    TorchScript: occlusion), with the modalities, classes and completion of its description.

    Example:
        >>> case_explainer(load_network("bundle/models"), load_description("bundle/models")).method  # doctest: +SKIP
        'gradcam'
    """
    data = description["data"]
    mods = data["modalities"]
    # a TorchScript module has lost its class: ask its description which method it was built by
    completes = completes_missing(description if isinstance(network, torch.jit.ScriptModule) else network)
    return Explainer(
        network,
        [(m["name"], int(m["channels"])) for m in mods if m["kind"] != "table"],
        completes,
        [str(c) for c in data["class_names"]],
        bool(data["multi_label"]),
        next((m["name"] for m in mods if m["kind"] == "table"), None),
        method,
    )


def _file_name(case_id: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", case_id).strip(".") or "case"
    name, n = stem, 1
    while name in used:  # two ids that differ only in replaced characters
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name + ".json"


class Predictor:
    """Predict every case of ``dataset`` and write ``predictions.csv`` plus one JSON per case.

    ``predictions.csv`` columns: ``case_id``, ``prob_<class>`` per class (or label), ``prediction`` (the
    most probable class; multi-label: the labels with probability >= 0.5, ``;``-separated), ``present``
    (the modalities the case has) and ``completed`` (the missing ones the network fills in: CMML's CRTA,
    mean imputation; empty for zero fill and modality dropout). ``cases/<case_id>.json`` holds the same
    plus the logits.

    Args:
        network: the served network (:func:`cmml_monai.deploy.load_network`).
        dataset: batch-contract items (:func:`inference_dataset`).
        description: the network description (classes, modalities, activation).
        output_dir: where the files go.
        batch_size: cases per forward pass.
        num_workers: loader workers.
        progress: show a progress bar (counts only, no case ids).
        write_cases: write the per-case JSON files.
        inferer: a MONAI inferer called as ``inferer(image, network, tabular)`` (e.g. ``SimpleInferer``, what
            a model-zoo ``inference.json`` names); None calls ``network(image, tabular)``.
        explain: also write ``cases/<case_id>.png`` (the case page: the inputs with their saliency maps, the
            table given, the probabilities, the completed inputs; :mod:`cmml_monai.evaluation.casepage`) and
            ``cases/index.html`` listing them. Costs a backward pass per present image modality and case.
        case_list: the cases (:func:`inference_cases`), for the raw table values the pages show (without it a
            page says only which cells were given).

    Example:
        >>> Predictor(net, inference_dataset(desc, cases), desc, "outputs/predictions").run()  # doctest: +SKIP
        'outputs/predictions/predictions.csv'
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dataset: Dataset,
        description: Mapping[str, Any],
        output_dir: str,
        batch_size: int = 8,
        num_workers: int = 0,
        progress: bool = True,
        write_cases: bool = True,
        inferer: Any = None,
        explain: bool = False,
        case_list: CaseList | None = None,
    ) -> None:
        self.network = network
        self.dataset = dataset
        self.description = description
        self.output_dir = os.fspath(output_dir)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.progress = bool(progress)
        self.write_cases = bool(write_cases)
        self.inferer = inferer
        data = description["data"]
        self.class_names = [str(c) for c in data["class_names"]]
        self.multi_label = bool(data["multi_label"])
        mods = data["modalities"]
        self.image_modalities = [(m["name"], int(m["channels"])) for m in mods if m["kind"] != "table"]
        self.table_name = next((m["name"] for m in mods if m["kind"] == "table"), None)
        self.completes = completes_missing(network)
        self.explain = bool(explain)
        self.case_list = case_list
        self.columns = list(data.get("table_columns") or [])
        self.preprocessing = description.get("preprocessing") or {}

    def _present(self, image: torch.Tensor, tabular: torch.Tensor | None) -> list[list[str]]:
        out = []
        for b in range(image.shape[0]):
            names, start = [], 0
            for name, channels in self.image_modalities:
                if not torch.isnan(image[b, start : start + channels]).all():
                    names.append(name)
                start += channels
            if self.table_name is not None and tabular is not None and not torch.isnan(tabular[b]).all():
                names.append(self.table_name)
            out.append(names)
        return out

    def _prediction(self, probs: list[float]) -> str:
        if self.multi_label:
            return ";".join(c for c, p in zip(self.class_names, probs) if p >= MULTI_LABEL_THRESHOLD)
        return self.class_names[max(range(len(probs)), key=probs.__getitem__)]

    @torch.no_grad()
    def run(self) -> str:
        """Predict and write the files; returns the path of ``predictions.csv``."""
        os.makedirs(self.output_dir, exist_ok=True)
        case_dir = os.path.join(self.output_dir, "cases")
        if self.write_cases or self.explain:
            os.makedirs(case_dir, exist_ok=True)
        explainer = case_explainer(self.network, self.description) if self.explain else None
        tables = {c.case_id: c.table for c in self.case_list.cases} if self.case_list is not None else {}
        pages: list[dict[str, Any]] = []
        loader = build_dataloader(self.dataset, self.batch_size, shuffle=False, num_workers=self.num_workers)
        device = next(self.network.parameters()).device
        self.network.eval()
        every = [name for name, _ in self.image_modalities] + ([self.table_name] if self.table_name else [])
        header = ["case_id", *[f"prob_{c}" for c in self.class_names], "prediction", "present", "completed"]
        rows, used = [], set()
        for batch in tqdm(loader, total=len(loader), desc="predict", unit="batch", disable=not self.progress):
            image = batch["image"].to(device)
            tabular = batch.get("tabular")
            tabular = tabular.to(device) if tabular is not None else None
            if self.inferer is None:
                logits = self.network(image, tabular).float()
            else:
                logits = self.inferer(image, self.network, tabular).float()
            probs = probabilities(logits, self.multi_label).cpu()
            present = self._present(image, tabular)
            for i, case_id in enumerate(batch["case_id"]):
                p = [float(v) for v in probs[i]]
                completed = [m for m in every if m not in present[i]] if self.completes else []
                record = {
                    "case_id": case_id,
                    "probabilities": dict(zip(self.class_names, p)),
                    "prediction": self._prediction(p),
                    "present": present[i],
                    "completed": completed,
                    "activation": "sigmoid" if self.multi_label else "softmax",
                    "logits": [float(v) for v in logits[i].cpu()],
                }
                rows.append([case_id, *p, record["prediction"], ";".join(present[i]), ";".join(completed)])
                name = _file_name(case_id, used) if self.write_cases or self.explain else ""
                if self.write_cases:
                    atomic_write_json(os.path.join(case_dir, name), record, indent=2)
                if explainer is not None:
                    page = name[: -len(".json")] + ".png"
                    self._page(explainer, batch, i, tables.get(case_id), os.path.join(case_dir, page))
                    pages.append({**record, "page": page})
        path = os.path.join(self.output_dir, PREDICTIONS_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        os.replace(tmp, path)
        logger.info("predictions for %d case(s): %s", len(rows), path)
        if explainer is not None:
            index = write_index(pages, os.path.join(case_dir, PAGES_INDEX_NAME))
            logger.info("case pages (%s maps) for %d case(s): %s", explainer.method_name, len(pages), index)
        return path

    def _page(
        self, explainer: Explainer, batch: Mapping[str, Any], i: int, table: Mapping[str, Any] | None, path: str
    ) -> None:
        """Explain case ``i`` of ``batch`` and write its page to ``path``."""
        tabular = batch.get("tabular")
        tabular = None if tabular is None else tabular[i : i + 1]
        values = None
        if self.columns:
            given = [False] * len(self.columns) if tabular is None else (~torch.isnan(tabular[0])).tolist()
            # the raw cells when the cases are known; otherwise only whether each was given
            values = {
                c: (table.get(c) if table is not None else "(given)" if g else None)
                for c, g in zip(self.columns, given)
            }
        explanation = explainer(batch["image"][i : i + 1], tabular, batch["case_id"][i], values)
        save_page(explanation, path, self.preprocessing.get("mean"), self.preprocessing.get("std"))


def score_predictions(output_dir: str, case_list: CaseList, description: Mapping[str, Any]) -> dict[str, Any]:
    """Score ``<output_dir>/predictions.csv`` against the labels of ``case_list`` (read with ``labels=True``):
    macro AUC, accuracy, macro F1 and ECE over every predicted case and per pattern of present modalities
    (the cases' own missingness). Writes ``<output_dir>/metrics.json``; what a packaged bundle's
    ``evaluate.json`` runs after the predictions.

    Raises:
        DataError: the cases have no labels or other classes than the model's.

    Example:
        >>> metrics = score_predictions("evaluation", case_list, load_description("bundle/x/models"))  # doctest: +SKIP
        >>> metrics["all"]["auc"]
        0.81
    """
    data = description["data"]
    classes = [str(c) for c in data["class_names"]]
    if [str(c) for c in case_list.class_names] != classes:
        raise DataError(
            f"the labelled cases have classes {case_list.class_names}, the model {classes}; "
            "evaluate on data with the model's classes"
        )
    labels = {c.case_id: c.label for c in case_list.cases}
    path = os.path.join(output_dir, PREDICTIONS_NAME)
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if labels.get(r["case_id"]) is not None]
    if not rows:
        raise DataError(f"{path}: no predicted case has a label; evaluation needs labelled cases")
    multi = bool(data["multi_label"])

    def score(subset: list[dict[str, str]]) -> dict[str, Any]:
        probs = [[float(r[f"prob_{c}"]) for c in classes] for r in subset]
        return classification_metrics(probs, [labels[r["case_id"]] for r in subset], multi)

    patterns: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        patterns.setdefault(r["present"].replace(";", "+"), []).append(r)
    result = {"all": score(rows), "by_present": {k: score(v) for k, v in sorted(patterns.items())}}
    atomic_write_json(os.path.join(output_dir, METRICS_NAME), result, indent=2)
    logger.info(
        "metrics over %d labelled case(s): AUC %.4f, accuracy %.4f (%s)",
        len(rows),
        result["all"]["auc"],
        result["all"]["acc"],
        os.path.join(output_dir, METRICS_NAME),
    )
    return result
