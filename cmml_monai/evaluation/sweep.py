"""The missing-rate sweep of docs/method.md §17 on one split, with saved seeded masks.

For each rate in ``rates`` every modality of every case is independently missing with that
probability (at least one kept); the masks are made once per split by
``cmml_monai.data.missingness.ensure_masks`` and reused by every method. Then every fixed subset of
modalities. Each condition is one ``CMMLEvaluator`` run over a ``PresenceMaskedDataset`` (the masking
path validation uses too), which writes NaN into the missing modalities, so the network sees exactly
what it would see when served; Ignite's ``EpochOutputStore`` keeps the per-case outputs.

Outputs in ``output_dir``: ``sweep.csv`` (method, rate, auc, acc, f1, ece, n), ``sweep.png``,
``subsets.csv`` (method, subset, auc, acc, f1, ece, n), ``roc_rate<r>.png``, ``summary.json`` (AVG AUC).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from ignite.handlers import EpochOutputStore
from monai.data import DataLoader
from torch.utils.data import Dataset

from cmml_monai.data.cases import CaseList
from cmml_monai.data.jsonio import atomic_open, atomic_write_json
from cmml_monai.data.missingness import DEFAULT_RATES, all_subsets, ensure_split_masks, fixed_subset_presence
from cmml_monai.data.validation import PresenceMaskedDataset
from cmml_monai.engines.evaluator import CMMLEvaluator
from cmml_monai.evaluation.plots import plot_roc, plot_sweep
from cmml_monai.metrics import classification_metrics
from cmml_monai.utils import as_bool

__all__ = ["MissingRateSweep", "predict", "SWEEP_COLUMNS", "SUBSET_COLUMNS", "format_table"]

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ("auc", "acc", "f1", "ece", "n")
SWEEP_COLUMNS = ("method", "rate", *METRIC_COLUMNS)
SUBSET_COLUMNS = ("method", "subset", *METRIC_COLUMNS)


def predict(
    network: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    multi_label: bool,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of ``loader``'s cases, in loader order (one ``CMMLEvaluator`` run).

    Example::

        >>> probs, labels = predict(net, DataLoader(masked_dataset), torch.device("cpu"), False)  # doctest: +SKIP
    """
    evaluator = CMMLEvaluator(device=device, val_data_loader=loader, network=network, amp=amp, decollate=False)
    store = EpochOutputStore(output_transform=lambda out: (out["pred"].float().cpu(), out["label"].cpu()))
    store.attach(evaluator)
    evaluator.logger.setLevel(logging.WARNING)  # one evaluator per condition: keep the console readable
    evaluator.run()
    if not store.data:
        return np.zeros((0, 0)), np.zeros((0,))
    logits = torch.cat([pred for pred, _ in store.data])
    probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=1)
    return probs.numpy(), torch.cat([label for _, label in store.data]).numpy()


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain fixed-width, left-aligned text table (printed to the console): rates as ``%g``, scores to 4
    decimals. Written here because pandas' ``to_string`` right-aligns the cells and prints NaN its own way."""

    def fmt(key: str, value: Any) -> str:
        if key == "rate":
            return f"{float(value):g}"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    cells = [[fmt(c, r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> str:
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        pd.DataFrame(list(rows), columns=list(columns)).to_csv(f, index=False, na_rep="nan")
    return path


def _kept_cases(mask: np.ndarray) -> np.ndarray:
    """Positions of the cases that keep at least one modality under ``mask``: the ones a condition scores."""
    return np.flatnonzero(mask.any(axis=1))


class MissingRateSweep:
    """Evaluate a trained network under simulated missingness and fixed modality subsets.

    Args:
        network: the served network (``net(image, tabular) -> logits``).
        case_list: the dataset's ``CaseList`` (modalities, natural presence, class names).
        dataset: the batch-contract dataset of ``split``, in ``case_list.split(split)`` order.
        output_dir: where the CSVs, PNGs and summary go.
        masks_dir: where ``masks_<split>.json`` is saved / reused (share it between methods).
        method: the method name written in every row.
        split: split evaluated (``"test"``).
        rates: missing rates.
        seed: mask seed.
        subsets: also evaluate every fixed subset of modalities.
        roc: write ROC PNGs (one per rate).
        predictions: also write each rate's per-case predictions, ``predictions_rate<r>.csv`` (case id,
            label, one probability per class or label, the prediction, the modalities the case kept).
        checkpoint: weights to load first (a checkpoint file of this package or a plain state dict); None = as is.
        device: device (default: CUDA if available, else CPU).
        amp: bf16 autocast on CUDA.
        batch_size, num_workers: of the evaluation loader.
        tracker: an ``MLflowTracker`` to log the tables, plots and metrics to (optional).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        case_list: CaseList,
        dataset: Dataset,
        output_dir: str,
        masks_dir: str,
        method: str = "cmml",
        split: str = "test",
        rates: Sequence[float] = DEFAULT_RATES,
        seed: int = 0,
        subsets: bool = True,
        roc: bool = True,
        predictions: bool = False,
        checkpoint: str | None = None,
        device: str | torch.device | None = None,
        amp: bool = False,
        batch_size: int = 16,
        num_workers: int = 0,
        tracker: Any = None,
    ) -> None:
        if not rates:
            raise ValueError(f"rates must not be empty, got {rates!r}")
        self.network = network
        self.case_list = case_list
        self.dataset = dataset
        self.output_dir = output_dir
        self.masks_dir = masks_dir
        self.method = method
        self.split = split
        self.rates = [float(r) for r in rates]
        self.seed = seed
        self.subsets = as_bool(subsets, "sweep#subsets")
        self.roc = as_bool(roc, "sweep#roc")
        self.predictions = as_bool(predictions, "sweep#predictions")
        self.checkpoint = checkpoint
        self.device = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.amp = as_bool(amp, "amp")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.tracker = tracker
        self.rows: list[dict] = []
        self.subset_rows: list[dict] = []

    def _load_checkpoint(self) -> None:
        if not self.checkpoint:
            return
        if not os.path.isfile(self.checkpoint):
            raise FileNotFoundError(f"checkpoint {self.checkpoint} not found: train first or set the checkpoint path")
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "network" in state and isinstance(state["network"], dict):
            state = state["network"]
        self.network.load_state_dict(state)
        logger.info("sweep: loaded %s", self.checkpoint)

    def _evaluate(self, mask: np.ndarray, case_ids: list[str]) -> tuple[dict, np.ndarray, np.ndarray]:
        """Metrics, probabilities and labels of the cases that keep at least one modality under ``mask``."""
        keep = _kept_cases(mask)
        channels = [m.channels for m in self.case_list.image_modalities]
        # the masked dataset checks that each item is the case its mask row belongs to
        masked = PresenceMaskedDataset(self.dataset, case_ids, mask, channels, indices=keep)
        loader = DataLoader(masked, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
        probs, labels = predict(self.network, loader, self.device, self.case_list.multi_label, self.amp)
        return classification_metrics(probs, labels, self.case_list.multi_label), probs, labels

    def run(self) -> list[dict]:
        """Run every condition, write the outputs, log them; returns the per-rate rows."""
        os.makedirs(self.output_dir, exist_ok=True)
        self._load_checkpoint()
        if not self.case_list.split(self.split):
            raise ValueError(f"split {self.split!r} has no cases; cannot run the sweep")
        case_ids, natural, masks = ensure_split_masks(
            self.case_list, self.split, len(self.dataset), self.masks_dir, self.rates, self.seed
        )
        self.rows, self.subset_rows = [], []
        for rate in self.rates:
            metrics, probs, labels = self._evaluate(masks[rate], case_ids)
            if self.predictions:
                self._write_predictions(rate, masks[rate], case_ids, probs, labels)
            row = {"method": self.method, "rate": rate, **{k: metrics[k] for k in METRIC_COLUMNS}}
            self.rows.append(row)
            logger.info(
                "sweep %s rate %.1f: %s",
                self.method,
                rate,
                " ".join(f"{k} {row[k]}" if k == "n" else f"{k} {row[k]:.4f}" for k in METRIC_COLUMNS),
            )
            if self.roc and len(labels):
                plot_roc(
                    probs,
                    labels,
                    self.case_list.class_names,
                    self.case_list.multi_label,
                    os.path.join(self.output_dir, f"roc_rate{rate:g}.png"),
                    f"{self.method}, missing rate {rate:g}",
                )
        if self.subsets:
            names = self.case_list.modality_names
            for subset in all_subsets(len(names)):
                sub_mask = fixed_subset_presence(natural, subset)
                if not sub_mask.any():
                    continue
                metrics, _, _ = self._evaluate(sub_mask, case_ids)
                label = "+".join(n for n, s in zip(names, subset) if s)
                self.subset_rows.append(
                    {"method": self.method, "subset": label, **{k: metrics[k] for k in METRIC_COLUMNS}}
                )
        self._write()
        return self.rows

    def _write_predictions(
        self, rate: float, mask: np.ndarray, case_ids: list[str], probs: np.ndarray, labels: np.ndarray
    ) -> str:
        """``predictions_rate<r>.csv``: one row per case that kept a modality at ``rate``, in split order."""
        keep = _kept_cases(mask)
        names = self.case_list.class_names
        frame = pd.DataFrame({"case_id": [case_ids[i] for i in keep]})
        if self.case_list.multi_label:
            for j, name in enumerate(names):
                frame[f"label_{name}"] = labels[:, j].astype(int)
            for j, name in enumerate(names):
                frame[f"prob_{name}"] = probs[:, j]
            frame["prediction"] = [";".join(n for n, p in zip(names, row) if p >= 0.5) for row in probs]
        else:
            frame["label"] = [names[int(c)] for c in labels]
            for j, name in enumerate(names):
                frame[f"prob_{name}"] = probs[:, j]
            frame["prediction"] = [names[int(c)] for c in probs.argmax(axis=1)]
        modalities = self.case_list.modality_names
        frame["present"] = ["+".join(m for m, p in zip(modalities, mask[i]) if p) for i in keep]
        path = os.path.join(self.output_dir, f"predictions_rate{rate:g}.csv")
        with atomic_open(path, "w", newline="", encoding="utf-8") as f:
            frame.to_csv(f, index=False)
        return path

    @property
    def avg_auc(self) -> float:
        """Mean AUC over the rates (NaN rates ignored)."""
        values = [r["auc"] for r in self.rows if r["auc"] == r["auc"]]
        return float(np.mean(values)) if values else float("nan")

    def _write(self) -> None:
        out = self.output_dir
        sweep_csv = _write_csv(os.path.join(out, "sweep.csv"), self.rows, SWEEP_COLUMNS)
        subsets_csv = _write_csv(os.path.join(out, "subsets.csv"), self.subset_rows, SUBSET_COLUMNS)
        png = plot_sweep(self.rows, os.path.join(out, "sweep.png"), f"{self.case_list.name}: AUC vs missing rate")
        summary = {
            "method": self.method,
            "dataset": self.case_list.name,
            "split": self.split,
            "avg_auc": self.avg_auc,
            "rates": self.rates,
        }
        atomic_write_json(os.path.join(out, "summary.json"), summary)
        print(f"\nMissing-rate sweep ({self.case_list.name}, {self.split} split, method {self.method}):")
        print(format_table(self.rows, SWEEP_COLUMNS))
        print(f"AVG AUC = {self.avg_auc:.4f}")
        if self.subset_rows:
            print("\nFixed modality subsets:")
            print(format_table(self.subset_rows, SUBSET_COLUMNS))
        print(f"\nwritten: {sweep_csv}, {subsets_csv}, {png}")
        if self.tracker is not None and getattr(self.tracker, "enabled", False):
            for path in (sweep_csv, subsets_csv, png, os.path.join(out, "summary.json")):
                self.tracker.log_artifact(path, "sweep")
            for rate in self.rates:
                self.tracker.log_artifact(os.path.join(out, f"roc_rate{rate:g}.png"), "sweep/roc")
            metrics = {f"test_{k}_rate_{r['rate']:g}": r[k] for k in METRIC_COLUMNS if k != "n" for r in self.rows}
            metrics["test_avg_auc"] = self.avg_auc
            self.tracker.log_metrics(metrics)
            print(
                f"MLflow: {self.tracker.tracking_uri} (experiment {self.tracker.experiment_name!r}); "
                f"view with: mlflow ui --backend-store-uri {self.tracker.tracking_uri}"
            )
